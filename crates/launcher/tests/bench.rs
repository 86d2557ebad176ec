//! End to end: `nestor bench --quick --modes all --json F --svg D` on this machine. The
//! process and container modes are measured; every mode appears, measured or skipped
//! with a reason (VM modes where KVM cannot boot a guest, scenario commands not built);
//! the JSON validates against crates/launcher/bench-schema.json (checked by a small
//! JSON Schema walker below, which refuses keywords it does not implement); the SVG
//! plots parse as XML and carry their titles. No timing is asserted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use common::*;

/// Validates `v` against `schema` (root `root` for $ref); the errors, with JSON paths.
fn validate(root: &Value, schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let s = match schema {
        Value::Object(s) => s,
        Value::Bool(true) => return,
        _ => panic!("schema at {path} is not an object"),
    };
    for (k, want) in s {
        match k.as_str() {
            "$schema" | "$id" | "title" | "description" | "$defs" => {}
            "$ref" => {
                let r = want.as_str().unwrap();
                let name = r
                    .strip_prefix("#/$defs/")
                    .unwrap_or_else(|| panic!("unsupported $ref {r}"));
                let target = &root["$defs"][name];
                assert!(!target.is_null(), "$ref {r} points nowhere");
                validate(root, target, v, path, errs);
            }
            "type" => {
                let types: Vec<&str> = match want {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
                    _ => panic!("bad type at {path}"),
                };
                let ok = types.iter().any(|t| match *t {
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    "string" => v.is_string(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    "number" => v.is_number(),
                    "integer" => v.is_i64() || v.is_u64(),
                    other => panic!("unknown type {other}"),
                });
                if !ok {
                    errs.push(format!("{path}: {v} is not of type {want}"));
                }
            }
            "const" => {
                if v != want {
                    errs.push(format!("{path}: {v} is not {want}"));
                }
            }
            "enum" => {
                if !want.as_array().unwrap().contains(v) {
                    errs.push(format!("{path}: {v} is not one of {want}"));
                }
            }
            "required" => {
                if let Some(o) = v.as_object() {
                    for r in want.as_array().unwrap() {
                        if !o.contains_key(r.as_str().unwrap()) {
                            errs.push(format!("{path}: missing {r}"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(o) = v.as_object() {
                    for (name, sub) in want.as_object().unwrap() {
                        if let Some(x) = o.get(name) {
                            validate(root, sub, x, &format!("{path}.{name}"), errs);
                        }
                    }
                }
            }
            "additionalProperties" => {
                assert_eq!(
                    want,
                    &Value::Bool(false),
                    "only additionalProperties: false"
                );
                if let Some(o) = v.as_object() {
                    let known = s.get("properties").and_then(Value::as_object);
                    for k in o.keys() {
                        if !known.is_some_and(|p| p.contains_key(k)) {
                            errs.push(format!("{path}: unexpected property {k}"));
                        }
                    }
                }
            }
            "items" => {
                if let Some(a) = v.as_array() {
                    for (i, x) in a.iter().enumerate() {
                        validate(root, want, x, &format!("{path}[{i}]"), errs);
                    }
                }
            }
            "minItems" => {
                if let Some(a) = v.as_array() {
                    if (a.len() as u64) < want.as_u64().unwrap() {
                        errs.push(format!("{path}: fewer than {want} items"));
                    }
                }
            }
            "minLength" => {
                if let Some(t) = v.as_str() {
                    if (t.chars().count() as u64) < want.as_u64().unwrap() {
                        errs.push(format!("{path}: shorter than {want}"));
                    }
                }
            }
            "minimum" => {
                if let Some(n) = v.as_f64() {
                    if n < want.as_f64().unwrap() {
                        errs.push(format!("{path}: {n} < {want}"));
                    }
                }
            }
            other => panic!("the schema walker does not implement '{other}' (at {path})"),
        }
    }
}

fn schema() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-schema.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn errors(doc: &Value) -> Vec<String> {
    let s = schema();
    let mut errs = Vec::new();
    validate(&s, &s, doc, "$", &mut errs);
    errs
}

const MODES: [&str; 6] = [
    "process",
    "container",
    "vm",
    "vm-container",
    "jailed-vm",
    "jailed-vm-container",
];

fn has_reason(x: &Value) -> bool {
    x["reason"].as_str().is_some_and(|r| !r.trim().is_empty())
}

/// `nestor bench --merge REPORT --svg DIR`: the report rendered, with its plots in DIR.
fn merge_with_plots(report: &Path, dir: &Path) -> std::process::Output {
    Command::new(nestor())
        .args(["bench", "--merge"])
        .arg(report)
        .arg("--svg")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn quick_bench_of_every_mode_reports_validates_and_plots() {
    let data = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(nestor());
        c.env("NESTOR_ROOT", data.path())
            .env("NESTOR_STATE", state.path())
            .args(args);
        c
    };
    let o = cmd(&["image", "import", sample_image().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "import: {}", stderr(&o));
    let json = out.path().join("bench.json");
    let svg = out.path().join("svg");
    let (out_md, out_err) = (out.path().join("out.md"), out.path().join("err.txt"));
    let mut child = cmd(&[
        "bench",
        "--quick",
        "--modes",
        "all",
        "--runs",
        "3",
        "--density-max",
        "4",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ])
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&out_md).unwrap())
    .stderr(std::fs::File::create(&out_err).unwrap())
    .spawn()
    .unwrap();
    // The JSON is written after each mode while the run goes on, marked partial, with
    // the modes measured so far: read it while the bench still runs.
    let mut seen_partial = None;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if seen_partial.is_none() {
            if let Ok(bytes) = std::fs::read(&json) {
                let running = child.try_wait().unwrap().is_none();
                let doc: Value = serde_json::from_slice(&bytes).unwrap();
                if running {
                    let modes: Vec<&str> = doc["modes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|m| m["mode"].as_str().unwrap())
                        .collect();
                    assert_eq!(doc["partial"], true, "{doc}");
                    assert!(modes.len() < MODES.len(), "{modes:?}");
                    assert_eq!(modes, MODES[..modes.len()], "in the run's order");
                    assert!(errors(&doc).is_empty(), "{:#?}", errors(&doc));
                    seen_partial = Some(modes.len());
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let md = std::fs::read_to_string(&out_md).unwrap();
    let err = std::fs::read_to_string(&out_err).unwrap();
    assert!(status.success(), "bench failed: {err}\n{md}");
    assert!(
        err.contains("bench: mode container"),
        "progress lines on stderr"
    );
    assert!(
        seen_partial.is_some(),
        "no partial JSON seen while the bench ran"
    );

    // The JSON validates, and the walker is not a rubber stamp.
    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let errs = errors(&doc);
    assert!(errs.is_empty(), "schema errors: {errs:#?}");
    assert_eq!(doc["partial"], false);
    let mut bad = doc.clone();
    bad["modes"][0]["status"] = "maybe".into();
    bad["header"].as_object_mut().unwrap().remove("kvm");
    bad["start_stop"][0]["extra"] = 1.into();
    assert_eq!(errors(&bad).len(), 3, "{:#?}", errors(&bad));

    // Every requested mode appears everywhere, measured or skipped with a reason.
    for m in MODES {
        let entry = doc["modes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["mode"] == m)
            .unwrap_or_else(|| panic!("mode {m} missing from modes"));
        assert!(
            entry["status"] == "measured" || has_reason(entry),
            "{entry}"
        );
        for section in ["start_stop", "unit_size", "density", "workloads"] {
            let rows: Vec<&Value> = doc[section]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| x["mode"] == m)
                .collect();
            assert!(!rows.is_empty(), "mode {m} missing from {section}");
            for r in rows {
                assert!(
                    r["status"] == "measured" || has_reason(r),
                    "{section} row without a reason: {r}"
                );
            }
        }
        assert!(
            md.contains(&format!("| {m} |")),
            "mode {m} not in the Markdown"
        );
    }
    for set in doc["workloads"].as_array().unwrap() {
        for x in set["results"].as_array().unwrap() {
            assert!(x["status"] == "measured" || has_reason(x), "{x}");
        }
    }

    // Process and container modes are measured here, every sample kept.
    let row = |mode: &str, runner: &str| {
        doc["start_stop"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["mode"] == mode && x["runner"] == runner)
            .cloned()
            .unwrap_or_else(|| panic!("no start_stop row {mode}/{runner}"))
    };
    for (mode, runner) in [
        ("process", "process"),
        ("container", "nestor"),
        ("container", "nestor-image"),
    ] {
        let r = row(mode, runner);
        assert_eq!(r["status"], "measured", "{r}");
        assert_eq!(r["samples"].as_array().unwrap().len(), 3, "{r}");
        assert!(r["start"]["median"].as_f64().unwrap() > 0.0);
    }
    for peer in ["crun", "runc"] {
        let r = row("container", peer);
        assert!(r["status"] == "measured" || has_reason(&r), "{r}");
        if r["status"] == "measured" {
            assert!(!r["version"].as_str().unwrap().is_empty(), "{r}");
        }
    }
    let wl = |mode: &str, w: &str| {
        doc["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["mode"] == mode)
            .and_then(|s| {
                s["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["workload"] == w && x["tool"] == "built-in")
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no {w} result for {mode}"))
    };
    // The native process and the native container wrote the same file, in the bench's
    // temp dir (bind-mounted into the container at the same path), and the report says so.
    let (p, c) = (
        wl("process", "disk-seq-write"),
        wl("container", "disk-seq-write"),
    );
    let path = p["detail"]["path"].as_str().unwrap();
    assert_eq!(Some(path), c["detail"]["path"].as_str(), "{p}\n{c}");
    assert!(path.contains("/nestor-bench-"), "{path}");
    assert!(
        md.contains("write the same file on the same file system"),
        "{md}"
    );
    for w in [
        "cpu",
        "mem",
        "disk-seq-write",
        "disk-seq-read",
        "disk-rand-read",
        "disk-rand-write",
        "net-tcp",
        "net-rtt",
    ] {
        for mode in ["process", "container"] {
            let x = wl(mode, w);
            assert_eq!(x["status"], "measured", "{mode} {w}: {x}");
            assert!(x["value"].as_f64().unwrap() > 0.0, "{x}");
            assert!(x["ratio_vs_process"].as_f64().unwrap() > 0.0, "{x}");
        }
        // The container's ratio is the median of 3 pairs (--quick), each kept, with its
        // 95% interval around it.
        let x = wl("container", w);
        let ratios = x["detail"]["pair_ratios"].as_array().unwrap();
        assert_eq!(ratios.len(), 3, "{x}");
        let q = x["ratio_vs_process"].as_f64().unwrap();
        let iv = x["ratio_interval"].as_array().unwrap();
        let (lo, hi) = (iv[0].as_f64().unwrap(), iv[1].as_f64().unwrap());
        assert!(0.0 < lo && lo <= hi, "{x}");
        let mut sorted: Vec<f64> = ratios.iter().map(|r| r.as_f64().unwrap()).collect();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(q, sorted[1], "the median pair: {x}");
    }
    let dens = |mode: &str| {
        doc["density"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["mode"] == mode)
            .cloned()
            .unwrap()
    };
    for mode in ["process", "container"] {
        let d = dens(mode);
        assert_eq!(d["status"], "measured", "{d}");
        assert!(!d["points"].as_array().unwrap().is_empty(), "{d}");
    }
    // Where KVM cannot boot a guest (kvm-pvm here), VM modes say so.
    if doc["header"]["kvm"]["guest_boot"] == false {
        assert!(md.contains("Linux guest boots here: **no**"), "{md}");
        for m in ["vm", "jailed-vm"] {
            let e = doc["modes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["mode"] == m)
                .unwrap();
            assert_eq!(e["status"], "skipped", "{e}");
        }
    }

    // Nothing left behind: no container state, no veth, no temp dirs.
    let left: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("state.json").exists())
        .collect();
    assert!(
        left.is_empty(),
        "containers left in the state root: {left:?}"
    );
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(
        !stdout(&links).contains(&format!("nbh{}", bench_pid(&doc).unwrap_or(0))),
        "veth left behind"
    );

    // The plots: four SVG files with their titles, parseable as XML, listed in the report.
    for (file, title) in [
        ("start-time.svg", "nestor bench: start time per mode"),
        (
            "overhead.svg",
            "nestor bench: workload overhead vs native process",
        ),
        ("density.svg", "nestor bench: density sweep"),
        (
            "efficiency.svg",
            "nestor bench: efficiency vs native process",
        ),
    ] {
        let text = std::fs::read_to_string(svg.join(file)).unwrap();
        let x =
            roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{file} is not XML: {e}"));
        assert_eq!(x.root_element().tag_name().name(), "svg");
        assert!(
            x.descendants()
                .filter(|n| n.has_tag_name("text"))
                .any(|n| n.text().is_some_and(|t| t.trim() == title)),
            "{file} has no title '{title}'"
        );
        assert!(md.contains(&format!("- `{file}`: ")), "{file} not listed");
    }
}

/// `--merge` of this host's run (VM modes skipped) with a stored test-host run (VM modes
/// measured) takes each mode from the first run that measured it; `--compare` of a run
/// with itself finds nothing changed, and of two runs, the rows both have.
#[test]
fn merge_takes_each_mode_from_a_run_that_measured_it_and_compare_pairs_rows() {
    let out = tempfile::tempdir().unwrap();
    let stored = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench-testhost.json");
    let mut here: Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    // This host's view: VM modes skipped with a reason, their rows gone.
    for m in here["modes"].as_array_mut().unwrap() {
        if m["mode"] != "process" && m["mode"] != "container" {
            m["status"] = "skipped".into();
            m["reason"] = "KVM here cannot boot a Linux guest".into();
        }
    }
    for section in ["start_stop", "unit_size", "density", "workloads"] {
        here[section]
            .as_array_mut()
            .unwrap()
            .retain(|x| x["mode"] == "process" || x["mode"] == "container");
    }
    here["header"]["kvm"]["guest_boot"] = false.into();
    let here_p = out.path().join("here.json");
    std::fs::write(&here_p, here.to_string()).unwrap();
    let merged = out.path().join("merged.json");
    let o = Command::new(nestor())
        .args(["bench", "--merge"])
        .args([&here_p, &stored])
        .arg("--json")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_slice(&std::fs::read(&merged).unwrap()).unwrap();
    assert!(errors(&doc).is_empty(), "{:#?}", errors(&doc));
    for m in doc["modes"].as_array().unwrap() {
        let want = if m["mode"] == "jailed-vm-container" {
            "skipped" // skipped in the stored run too
        } else {
            "measured"
        };
        assert_eq!(m["status"], want, "{m}");
    }
    assert_eq!(doc["header"]["kvm"]["guest_boot"], true);
    assert!(stdout(&o).contains("merged from 2 runs"), "{}", stdout(&o));

    let o = Command::new(nestor())
        .args(["bench", "--compare"])
        .args([&stored, &stored])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(" 0 better, 0 worse,"), "{}", stdout(&o));
    let o = Command::new(nestor())
        .args(["bench", "--compare"])
        .args([&stored, &here_p])
        .output()
        .unwrap();
    assert!(stdout(&o).contains("(old only)"), "{}", stdout(&o));
    // Not a report: one line naming the file.
    let o = Command::new(nestor())
        .args(["bench", "--merge", "/etc/hostname"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/etc/hostname: not a nestor bench report"),
        "{}",
        stderr(&o)
    );
}

/// The stored test-host run through `--merge --svg`: every plot of its sections is
/// written, efficiency.svg among them with every mode of the efficiency table, and the
/// report lists each file.
#[test]
fn stored_run_plots_the_efficiency_table_and_lists_every_plot() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench-testhost.json");
    let svg = tempfile::tempdir().unwrap();
    let o = merge_with_plots(&p, svg.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let md = stdout(&o);
    assert!(md.contains("\n## Plots ("), "{md}");
    for file in [
        "start-time.svg",
        "overhead.svg",
        "density.svg",
        "efficiency.svg",
    ] {
        assert!(svg.path().join(file).is_file(), "{file} not written");
        assert!(
            md.contains(&format!("- `{file}`: ")),
            "{file} not listed in\n{md}"
        );
    }
    let text = std::fs::read_to_string(svg.path().join("efficiency.svg")).unwrap();
    let x = roxmltree::Document::parse(&text).unwrap();
    let texts: Vec<&str> = x
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    assert!(texts.contains(&"nestor bench: efficiency vs native process"));
    for mode in [
        "container",
        "vm",
        "vm-container",
        "jailed-vm",
        "jailed-vm-container",
    ] {
        assert!(
            texts.iter().any(|t| t.starts_with(&format!("{mode}: "))),
            "{mode} not in {texts:?}"
        );
    }
}

/// The bench's pid, from a bundle path in the JSON (it names its temp dir after it).
fn bench_pid(doc: &Value) -> Option<u32> {
    doc["unit_size"]
        .as_array()?
        .iter()
        .flat_map(|u| u["disk"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["path"].as_str().map(str::to_string))
        .find_map(|p| {
            p.split('/')
                .find(|s| s.starts_with("nestor-bench-"))
                .and_then(|s| s.split('-').nth(2))
                .and_then(|n| n.parse().ok())
        })
}

#[test]
fn bad_modes_are_refused_with_the_list() {
    let o = Command::new(nestor())
        .args(["bench", "--modes", "process,vmm"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("unknown mode 'vmm'") && e.contains("jailed-vm"),
        "{e}"
    );
}

#[test]
fn workload_program_prints_json_results() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(nestor())
        .args(["workload", "cpu", "mem", "disk", "--secs", "0.1"])
        .args(["--mem-mib", "4", "--disk-mib", "2", "--disk"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .filter_map(|l| l.strip_prefix("NESTOR-WORKLOAD "))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    let names: Vec<&str> = lines
        .iter()
        .filter_map(|v| v["workload"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "cpu",
            "mem",
            "disk-seq-write",
            "disk-seq-read",
            "disk-rand-read",
            "disk-rand-write"
        ]
    );
    assert!(lines.iter().all(|v| v["value"].as_f64().unwrap() > 0.0));
    assert!(!dir.path().join("d").exists(), "the disk file is removed");
    let o = Command::new(nestor())
        .args(["workload", "net", "--net", "not-an-address"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stdout(&o).contains("\"error\""), "{}", stdout(&o));
}

/// A report from a real run inside the KVM test host (scripts/compare.sh's second step),
/// kept as a fixture: the schema covers measured VM rows too, not only skipped ones.
#[test]
fn testhost_report_with_measured_vm_modes_validates() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench-testhost.json");
    let doc: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let errs = errors(&doc);
    assert!(errs.is_empty(), "schema errors: {errs:#?}");
    assert_eq!(doc["header"]["inside_testhost"], true);
    for (mode, runner) in [
        ("vm", "nestor-vmm"),
        ("vm", "qemu-microvm"),
        ("vm-container", "nestor"),
        ("jailed-vm", "nestor-vmm"),
    ] {
        let r = doc["start_stop"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["mode"] == mode && x["runner"] == runner)
            .unwrap_or_else(|| panic!("no {mode}/{runner} row"));
        assert_eq!(r["status"], "measured", "{r}");
    }
}

/// A warm-start row (`run --vm --vm-warm`, runner "nestor --vm-warm") beside the
/// mode's cold row validates and renders: its own efficiency column, and the line
/// giving its start against the cold one's, as a ratio.
#[test]
fn a_warm_start_row_renders_against_its_cold_start() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench-testhost.json");
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let rows = doc["start_stop"].as_array_mut().unwrap();
    let cold = rows
        .iter()
        .find(|x| x["mode"] == "vm-container" && x["runner"] == "nestor")
        .cloned()
        .unwrap();
    let cold_ms = cold["start"]["median"].as_f64().unwrap();
    let mut warm = cold.clone();
    warm["runner"] = "nestor --vm-warm".into();
    for s in warm["samples"].as_array_mut().unwrap() {
        s["start_ms"] = (s["start_ms"].as_f64().unwrap() / 4.0).into();
    }
    for k in ["median", "p10", "p90", "min", "max", "mean"] {
        if let Some(v) = warm["start"][k].as_f64() {
            warm["start"][k] = (v / 4.0).into();
        }
    }
    let at = rows.iter().position(|x| x == &cold).unwrap() + 1;
    rows.insert(at, warm);
    let errs = errors(&doc);
    assert!(errs.is_empty(), "schema errors: {errs:#?}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.json");
    std::fs::write(&f, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = merge_with_plots(&f, dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains("vm-container: nestor --vm-warm"), "{md}");
    let line = md
        .lines()
        .find(|l| l.starts_with("Warm starts"))
        .unwrap_or_else(|| panic!("no warm-start line in\n{md}"));
    assert!(
        line.contains("vm-container ") && line.contains("(0.25x)"),
        "{line} (cold {cold_ms})"
    );
}

/// A state-transfer run in the test host (`--quick --runs 2 --modes vm-container
/// --sections state-transfer`, kept as test data) validates, every row measured, CRIU
/// included, and renders through `--merge` with its goals.
#[test]
fn testhost_state_transfer_report_validates_and_renders() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench-testhost-xfer.json");
    let doc: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let errs = errors(&doc);
    assert!(errs.is_empty(), "schema errors: {errs:#?}");
    let x = &doc["state_transfer"][0];
    assert_eq!(x["mode"], "vm-container");
    assert_eq!(x["status"], "measured");
    for row in x["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .chain(x["migrations"].as_array().unwrap())
    {
        assert_eq!(row["status"], "measured", "{row}");
    }
    assert_eq!(x["criu"]["status"], "measured");
    let svg = tempfile::tempdir().unwrap();
    let out = merge_with_plots(&p, svg.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    for want in [
        "## State transfer: vm-container",
        "| 1 GiB |",
        "| post-copy | dirtying |",
        "CRIU on a native busybox container",
        "goal <= 1.0x: **met**",
        "goal <= 100 ms: ",
    ] {
        assert!(md.contains(want), "{want:?} missing in\n{md}");
    }
    // Sections the run did not ask for print no empty tables.
    assert!(!md.contains("## Density"), "{md}");
    // Its plot: one bar group per guest size and per guest, with their labels; no fs
    // plot for a report without that section.
    let text = std::fs::read_to_string(svg.path().join("state-transfer.svg")).unwrap();
    let x = roxmltree::Document::parse(&text).unwrap();
    let texts: Vec<&str> = x
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for want in [
        "nestor bench: state transfer",
        "vm-container 256 MiB",
        "vm-container dirtying",
        "post-copy (paused)",
    ] {
        assert!(texts.contains(&want), "{want:?} not in {texts:?}");
    }
    assert!(!svg.path().join("fs.svg").exists());
}

/// `nestor bench --sections fs --quick`: the host process and the native bind mount are
/// measured on this machine, every figure with its ratio to a host process's run on the
/// same directory; the microVM rows (virtio-fs, virtio-blk) are measured where KVM here
/// boots a guest and otherwise skipped with the reason, said once, never counted as
/// measured. The JSON validates, the plot parses, and the tmpfs directory is gone.
#[test]
fn fs_section_measures_host_and_bind_and_skips_vm_rows_with_a_reason() {
    let data = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(nestor());
        c.env("NESTOR_ROOT", data.path())
            .env("NESTOR_STATE", state.path())
            .args(args);
        c
    };
    let o = cmd(&["image", "import", sample_image().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "import: {}", stderr(&o));
    let json = out.path().join("fs.json");
    let svg = out.path().join("svg");
    let o = cmd(&[
        "bench",
        "--quick",
        "--sections",
        "fs",
        "--modes",
        "process,container,vm-container",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ])
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let (md, err) = (stdout(&o), stderr(&o));
    assert!(o.status.success(), "bench failed: {err}\n{md}");
    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let errs = errors(&doc);
    assert!(errs.is_empty(), "schema errors: {errs:#?}");
    assert_eq!(doc["partial"], false);
    // Only the fs section ran.
    for section in ["start_stop", "workloads", "state_transfer"] {
        assert!(doc[section].as_array().unwrap().is_empty(), "{section}");
    }
    let sets = doc["fs"].as_array().unwrap();
    let modes: Vec<&str> = sets.iter().map(|s| s["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["process", "container", "vm-container"]);
    let row = |mode: &str, path: &str| {
        sets.iter()
            .find(|s| s["mode"] == mode)
            .and_then(|s| {
                s["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["path"] == path)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no fs row {mode}/{path}"))
    };
    for (mode, path) in [("process", "host"), ("container", "native-bind")] {
        let r = row(mode, path);
        assert_eq!(r["status"], "measured", "{r}");
        let results = r["results"].as_array().unwrap();
        let names: Vec<&str> = results
            .iter()
            .map(|x| x["workload"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "disk-seq-write",
                "disk-seq-read",
                "disk-rand-read",
                "disk-rand-write",
                "fs-meta"
            ]
        );
        for x in results {
            assert_eq!(x["status"], "measured", "{mode} {path}: {x}");
            let (v, h) = (
                x["value"].as_f64().unwrap(),
                x["host_value"].as_f64().unwrap(),
            );
            assert!(v > 0.0 && h > 0.0, "{x}");
            // The host value lies between the host runs before and after the row.
            let hs: Vec<f64> = x["host_values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(hs.len(), 2, "{x}");
            let (lo, hi) = (hs[0].min(hs[1]), hs[0].max(hs[1]));
            assert!(lo * (1.0 - 1e-9) <= h && h <= hi * (1.0 + 1e-9), "{x}");
            let q = x["ratio_vs_host"].as_f64().unwrap();
            assert!((q - v / h).abs() <= 1e-9 * q.max(1.0), "{x}");
        }
        assert!(
            md.contains(&format!("| {path} | {mode} |")),
            "{path} not in the Markdown:\n{md}"
        );
    }
    let vm_rows: Vec<Value> = [
        "virtio-fs-auto",
        "virtio-fs-always",
        "virtio-fs-never",
        "virtio-blk",
    ]
    .iter()
    .map(|p| row("vm-container", p))
    .collect();
    if doc["header"]["kvm"]["guest_boot"] == false {
        let why = doc["header"]["kvm"]["guest_boot_detail"].as_str().unwrap();
        assert!(!why.is_empty());
        for r in &vm_rows {
            assert_eq!(r["status"], "skipped", "{r}");
            assert_eq!(r["reason"], why, "{r}");
            for x in r["results"].as_array().unwrap() {
                assert_eq!(x["status"], "skipped", "{x}");
                assert!(x["value"].is_null() && x["ratio_vs_host"].is_null(), "{x}");
            }
        }
        let set = &sets[2];
        assert_eq!(set["status"], "skipped", "{set}");
        let entry = doc["modes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mode"] == "vm-container")
            .unwrap();
        assert_eq!(entry["status"], "skipped", "{entry}");
        // The reason once in the report (numbered, then referred to) and once in the
        // progress lines.
        assert_eq!(md.matches(why).count(), 1, "{md}");
        assert_eq!(err.matches(why).count(), 1, "{err}");
        assert!(
            md.contains("| virtio-blk | vm-container | skipped: see ["),
            "{md}"
        );
        assert!(!md.contains("Goal, in this run: virtio-fs"), "{md}");
    } else {
        for r in &vm_rows {
            assert!(r["status"] == "measured" || has_reason(r), "{r}");
        }
    }
    // The plot: fs.svg with its title, parseable as XML.
    let text = std::fs::read_to_string(svg.join("fs.svg")).unwrap();
    let x = roxmltree::Document::parse(&text).unwrap();
    assert!(
        x.descendants().filter(|n| n.has_tag_name("text")).any(|n| n
            .text()
            .is_some_and(|t| t.trim() == "nestor bench: shared directory vs host process")),
        "fs.svg has no title"
    );
    // The directory (on the bench's tmpfs, in its temp dir) and every container are gone.
    for s in sets.iter().filter(|s| s["status"] == "measured") {
        let dir = s["dir"].as_str().unwrap().trim_end_matches(" (tmpfs)");
        assert!(dir.contains("nestor-bench-"), "{dir}");
        assert!(!Path::new(dir).exists(), "{dir} left behind");
    }
    let left: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("state.json").exists())
        .collect();
    assert!(left.is_empty(), "containers left: {left:?}");
}

/// An fs run in the test host (`benches/fs-bench.sh`: `--sections fs --modes
/// process,container,vm-container`, full sizes, kept as test data) validates with every
/// row measured, renders its table and goal through `--merge`, and plots.
#[test]
fn testhost_fs_report_validates_and_renders() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench-testhost-fs.json");
    let doc: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let errs = errors(&doc);
    assert!(errs.is_empty(), "schema errors: {errs:#?}");
    let paths: Vec<&str> = doc["fs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["rows"].as_array().unwrap())
        .inspect(|r| assert_eq!(r["status"], "measured", "{r}"))
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "host",
            "native-bind",
            "virtio-fs-auto",
            "virtio-fs-always",
            "virtio-blk"
        ]
    );
    let svg = tempfile::tempdir().unwrap();
    let out = merge_with_plots(&p, svg.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let md = stdout(&out);
    let auto = doc["fs"][2]["rows"][0]["results"][1].clone();
    assert_eq!(auto["workload"], "disk-seq-read");
    let q = auto["ratio_vs_host"].as_f64().unwrap();
    let verdict = format!(
        "(goal >= 0.5x: {})",
        if q >= 0.5 { "**met**" } else { "**not met**" }
    );
    for want in [
        "## Shared directory",
        "| virtio-fs-auto | vm-container |",
        "| virtio-blk | vm-container |",
        verdict.as_str(),
    ] {
        assert!(md.contains(want), "{want:?} missing in\n{md}");
    }
    let text = std::fs::read_to_string(svg.path().join("fs.svg")).unwrap();
    let x = roxmltree::Document::parse(&text).unwrap();
    let texts: Vec<&str> = x
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for want in [
        "host process = 1x",
        "virtio-fs-always",
        "fs-meta",
        "1x",
        "0.01x",
    ] {
        assert!(texts.contains(&want), "{want:?} not in {texts:?}");
    }
}
