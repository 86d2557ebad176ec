//! Compiling a filter set (JSON) into one BPF program per thread kind (the built-in set
//! comes compiled by build.rs: [`built_in`]) and installing them: [`setup`] on the main
//! thread before the VM is built, [`enter`] first thing in every thread,
//! [`install_main`] once the vCPU threads are spawned, with the gate that keeps vCPUs
//! out of KVM_RUN until every thread is filtered.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock};

use seccompiler::{BpfProgram, TargetArch};
use serde_json::Value;

use super::policy::{add_report_syscalls, default_filters};
use super::{report, SeccompArgs, SeccompError, SeccompMode, ThreadKind, THREAD_KINDS};

/// Compiled programs, one per thread kind.
pub struct Filters {
    main: BpfProgram,
    vcpu: BpfProgram,
    virtio: BpfProgram,
    pages: BpfProgram,
}

/// Compiles a filter set (JSON) into the four programs; `path` names its file.
pub fn compile(mut set: Value, path: Option<PathBuf>) -> Result<Filters, SeccompError> {
    let bad = |msg: String| SeccompError::Invalid {
        path: path.clone(),
        msg,
    };
    let Some(obj) = set.as_object_mut() else {
        return Err(bad("the top level must be an object of filters".into()));
    };
    for k in obj.keys() {
        if !THREAD_KINDS.contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown thread kind '{k}' (expected main, vcpu, virtio, pages)"
            )));
        }
    }
    for k in THREAD_KINDS {
        let f = obj
            .get_mut(k)
            .ok_or_else(|| bad(format!("no filter for thread kind '{k}'")))?;
        add_report_syscalls(f);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| bad(format!("{e:?}")))?;
    let text = serde_json::to_vec(&set).map_err(|e| bad(e.to_string()))?;
    let mut map =
        seccompiler::compile_from_json(text.as_slice(), arch).map_err(|e| bad(e.to_string()))?;
    let mut take = |k: &str| {
        map.remove(k)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad(format!("filter '{k}' is empty")))
    };
    Ok(Filters {
        main: take("main")?,
        vcpu: take("vcpu")?,
        virtio: take("virtio")?,
        pages: take("pages")?,
    })
}

/// The built-in filters as build.rs compiled them (see its doc for the layout); empty
/// when it could not (another target architecture).
static BUILT_IN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-filters.bin"));

/// The built-in filters compiled at build time: `None` when there are none, or when
/// they were made for another kick signal than this process's (the policy allows
/// `tgkill` with it only), so the caller compiles them afresh instead.
pub fn built_in() -> Option<Filters> {
    built_in_from(BUILT_IN, crate::vstate::vcpu::kick_signal())
}

fn built_in_from(bin: &[u8], kick: i32) -> Option<Filters> {
    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }
    let rest = bin.strip_prefix(b"NSBPF1")?;
    if u32_at(rest, 0)? != kick as u32 {
        return None;
    }
    let mut at = 4;
    let mut progs = Vec::with_capacity(THREAD_KINDS.len());
    for _ in THREAD_KINDS {
        let n = u32_at(rest, at)? as usize;
        at += 4;
        let body = rest.get(at..at.checked_add(n.checked_mul(8)?)?)?;
        at += body.len();
        let prog: BpfProgram = body
            .chunks_exact(8)
            .map(|c| seccompiler::sock_filter {
                code: u16::from_le_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        if prog.is_empty() {
            return None;
        }
        progs.push(prog);
    }
    if at != rest.len() {
        return None;
    }
    let mut it = progs.into_iter();
    Some(Filters {
        main: it.next()?,
        vcpu: it.next()?,
        virtio: it.next()?,
        pages: it.next()?,
    })
}

/// Reads and compiles a filter file.
pub fn from_file(path: &std::path::Path) -> Result<Filters, SeccompError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|source| SeccompError::Read {
            path: path.into(),
            source,
        })?;
    let set: Value = serde_json::from_str(&text).map_err(|e| SeccompError::Invalid {
        path: Some(path.into()),
        msg: e.to_string(),
    })?;
    compile(set, Some(path.into()))
}

static FILTERS: OnceLock<Filters> = OnceLock::new();
/// The vCPU gate: `open` is set by [`install_main`] once the main thread's filter is in
/// and every expected thread has installed its own (`entered` counts them); vCPU threads
/// wait for it before their first KVM_RUN.
struct Gate {
    open: bool,
    entered: usize,
}
static GATE: (Mutex<Gate>, Condvar) = (
    Mutex::new(Gate {
        open: true,
        entered: 0,
    }),
    Condvar::new(),
);
/// How long [`install_main`] waits for the other threads to install their filters.
const ENTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn gate() -> std::sync::MutexGuard<'static, Gate> {
    GATE.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prepares filtering for this process from the flags (call once, on the main thread,
/// before building the VM): compiles the filter set, installs the SIGSYS handler and
/// closes the vCPU gate. `--seccomp none` (without a file) leaves everything unfiltered.
pub fn setup(args: &SeccompArgs) -> Result<(), SeccompError> {
    let filters = match (&args.seccomp_filter, args.seccomp) {
        (Some(p), _) => from_file(p)?,
        (None, SeccompMode::Default) => match built_in() {
            Some(f) => f,
            None => compile(default_filters()?, None)?,
        },
        (None, SeccompMode::None) => return Ok(()),
    };
    report::install_handler()?;
    gate().open = false;
    let _ = FILTERS.set(filters);
    Ok(())
}

fn die(e: SeccompError) -> ! {
    crate::eprintln_capped!("nestor-vmm: error: {e}");
    // SAFETY: ends the process at once; nothing else is needed.
    unsafe { libc::_exit(1) }
}

/// Installs this thread's filter (first thing in every VMM thread; a no-op when
/// filtering is off) and counts it for [`install_main`]. vCPU threads then wait until
/// [`install_main`] opened their gate.
pub fn enter(kind: ThreadKind) {
    let Some(f) = FILTERS.get() else {
        return;
    };
    report::set_thread(kind);
    let prog = match kind {
        ThreadKind::Main | ThreadKind::Signals => &f.main,
        ThreadKind::Vcpu(_) => &f.vcpu,
        ThreadKind::Virtio => &f.virtio,
        ThreadKind::Pages => &f.pages,
    };
    if let Err(e) = seccompiler::apply_filter(prog) {
        die(SeccompError::Install {
            thread: kind.key(),
            msg: e.to_string(),
        });
    }
    if kind == ThreadKind::Main {
        return;
    }
    let mut g = gate();
    g.entered += 1;
    GATE.1.notify_all();
    if let ThreadKind::Vcpu(_) = kind {
        while !g.open {
            g = GATE.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Installs the main thread's filter, waits until `threads` other threads (every vCPU
/// thread and the virtio event thread, plus any other VMM thread that calls [`enter`])
/// have installed theirs, then lets the vCPUs run: so no guest code runs while any VMM
/// thread is unfiltered. Call after the vCPU threads are spawned, with the number that
/// were (a thread missing after a long wait ends the VMM with status 1).
pub fn install_main(threads: usize) {
    if FILTERS.get().is_none() {
        gate().open = true;
        GATE.1.notify_all();
        return;
    }
    enter(ThreadKind::Main);
    let deadline = std::time::Instant::now() + ENTER_TIMEOUT;
    let mut g = gate();
    while g.entered < threads {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            die(SeccompError::Install {
                thread: "main",
                msg: format!(
                    "only {} of {threads} VMM threads installed their filters",
                    g.entered
                ),
            });
        }
        g = GATE
            .1
            .wait_timeout(g, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    g.open = true;
    GATE.1.notify_all();
}

/// Whether filters are in force in this process.
pub fn active() -> bool {
    FILTERS.get().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn built_in_filters_compile_and_name_their_syscalls() {
        let set = default_filters().unwrap();
        for k in THREAD_KINDS {
            let rules = set[k]["filter"].as_array().unwrap();
            assert!(rules.len() > 20, "{k}");
        }
        // KVM_RUN is on the vCPU thread only.
        let has_run = |k: &str| {
            set[k]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["comment"] == "KVM_RUN")
        };
        assert!(has_run("vcpu"));
        assert!(!has_run("main") && !has_run("virtio"));
        let f = compile(set, None).unwrap();
        assert!(!f.main.is_empty() && !f.vcpu.is_empty() && !f.virtio.is_empty());
        assert!(!f.pages.is_empty());
    }

    #[test]
    fn the_filters_compiled_at_build_time_are_the_policy_compiled_now() {
        let built = built_in().expect("build.rs compiled the built-in filters");
        let now = compile(default_filters().unwrap(), None).unwrap();
        assert!(built.main == now.main, "main");
        assert!(built.vcpu == now.vcpu, "vcpu");
        assert!(built.virtio == now.virtio, "virtio");
        assert!(built.pages == now.pages, "pages");
        // Another kick signal, a cut or padded file: none of it is used.
        let kick = crate::vstate::vcpu::kick_signal();
        assert!(built_in_from(BUILT_IN, kick + 1).is_none());
        assert!(built_in_from(&BUILT_IN[..BUILT_IN.len() - 1], kick).is_none());
        let mut longer = BUILT_IN.to_vec();
        longer.push(0);
        assert!(built_in_from(&longer, kick).is_none());
        assert!(built_in_from(b"", kick).is_none());
    }

    #[test]
    fn incomplete_or_garbage_sets_are_refused_clearly() {
        let mut set = default_filters().unwrap();
        set.as_object_mut().unwrap().remove("virtio");
        let e = compile(set, None).err().unwrap().to_string();
        assert!(e.contains("no filter for thread kind 'virtio'"), "{e}");
        let mut set = default_filters().unwrap();
        set["gpu"] = set["main"].clone();
        let e = compile(set, None).err().unwrap().to_string();
        assert!(e.contains("unknown thread kind 'gpu'"), "{e}");
        let mut set = default_filters().unwrap();
        set["main"]["filter"][0]["syscall"] = json!("no_such_call");
        let e = compile(set, None).err().unwrap().to_string();
        assert!(e.contains("no_such_call"), "{e}");
        let e = compile(json!([1, 2]), None).err().unwrap().to_string();
        assert!(e.contains("object of filters"), "{e}");
    }

    #[test]
    fn report_syscalls_are_added_only_where_missing() {
        let mut f = json!({"mismatch_action": "trap", "match_action": "allow",
                           "filter": [{"syscall": "read"}]});
        add_report_syscalls(&mut f);
        let rules = f["filter"].as_array().unwrap();
        assert!(rules
            .iter()
            .any(|r| r["syscall"] == "write" && r["args"][0]["val"] == 2));
        assert!(rules.iter().any(|r| r["syscall"] == "exit_group"));
        // An unconditional write stays unconditional (no narrowing rule added).
        let mut f = json!({"mismatch_action": "trap", "match_action": "allow",
                           "filter": [{"syscall": "write"}, {"syscall": "exit_group"}]});
        add_report_syscalls(&mut f);
        assert_eq!(f["filter"].as_array().unwrap().len(), 2);
    }
}
