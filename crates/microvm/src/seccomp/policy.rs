//! The built-in filters, as data: one allow-list per thread kind (`main`, `vcpu`,
//! `virtio`, `pages`) of syscalls with optional argument conditions, turned into
//! seccompiler's JSON format by [`default_filters`] (what `--seccomp-print` prints).
//! Nothing here compiles or installs anything.
//!
//! userfaultfd (post-copy migration) is confined to the `pages` filter, which only a
//! post-copy destination's page thread installs: it places pages (`UFFDIO_COPY`) and
//! unregisters guest memory at the end (`UFFDIO_UNREGISTER`), nothing else. The
//! userfaultfd itself is created and registered (`userfaultfd(2)` or
//! `/dev/userfaultfd`, `UFFDIO_API`, `UFFDIO_REGISTER`) by the main thread before its
//! filter goes in, so no filter allows those; the other filters allow no userfaultfd
//! ioctl at all. `madvise` is allowed with `MADV_DONTNEED`: glibc's, when a thread
//! ends (its stack given back) and when a thread's malloc arena shrinks, and the
//! balloon's for private guest memory; the threads that run device back-ends (`vcpu`,
//! `virtio`) may also use `MADV_REMOVE`, the balloon's for shared guest memory.

use serde_json::{json, Value};

use super::names::syscall_name;
use super::SeccompError;

/// `ioctl` request numbers the filters allow.
mod ioctls {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip,
        kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
        kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };
    use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

    const fn size<T>() -> u32 {
        std::mem::size_of::<T>() as u32
    }
    const fn get<T>(nr: u32) -> u64 {
        ioctl_expr(_IOC_READ, KVMIO, nr, size::<T>())
    }
    const fn get_set<T>(nr: u32) -> u64 {
        ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size::<T>())
    }
    pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0);
    pub const KVM_GET_REGS: u64 = get::<kvm_regs>(0x81);
    pub const KVM_GET_MP_STATE: u64 = get::<kvm_mp_state>(0x98);
    /// What a paused vCPU thread reads for a snapshot (besides the two above).
    pub const VCPU_SAVE: [(u64, &str); 9] = [
        (get::<kvm_sregs>(0x83), "KVM_GET_SREGS"),
        (get_set::<kvm_msrs>(0x88), "KVM_GET_MSRS"),
        (get::<kvm_fpu>(0x8c), "KVM_GET_FPU"),
        (get::<kvm_lapic_state>(0x8e), "KVM_GET_LAPIC"),
        (get_set::<kvm_cpuid2>(0x91), "KVM_GET_CPUID2"),
        (get::<kvm_vcpu_events>(0x9f), "KVM_GET_VCPU_EVENTS"),
        (get::<kvm_debugregs>(0xa1), "KVM_GET_DEBUGREGS"),
        (get::<kvm_xsave>(0xa4), "KVM_GET_XSAVE"),
        (get::<kvm_xcrs>(0xa6), "KVM_GET_XCRS"),
    ];
    /// What the main thread reads of the VM for a snapshot (the dirty log: the
    /// pages a diff snapshot writes), and the memory slots' flags it changes to switch
    /// the dirty log on for a pre-copy migration (the same slots, addresses and sizes).
    pub const VM_SAVE: [(u64, &str); 5] = [
        (
            ioctl_expr(
                _IOC_WRITE,
                KVMIO,
                0x46,
                size::<kvm_userspace_memory_region>(),
            ),
            "KVM_SET_USER_MEMORY_REGION",
        ),
        (get_set::<kvm_irqchip>(0x62), "KVM_GET_IRQCHIP"),
        (
            ioctl_expr(_IOC_WRITE, KVMIO, 0x42, size::<kvm_dirty_log>()),
            "KVM_GET_DIRTY_LOG",
        ),
        (get::<kvm_clock_data>(0x7c), "KVM_GET_CLOCK"),
        (get::<kvm_pit_state2>(0x9f), "KVM_GET_PIT2"),
    ];
    /// userfaultfd's ioctl type (`UFFDIO`).
    pub const UFFDIO: u32 = 0xAA;
    /// `UFFDIO_COPY` (`struct uffdio_copy`, 40 bytes): fill a missing page and wake its
    /// waiters.
    pub const UFFDIO_COPY: u64 = ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, 0x03, 40);
    /// `UFFDIO_UNREGISTER` (`struct uffdio_range`, 16 bytes).
    pub const UFFDIO_UNREGISTER: u64 = ioctl_expr(_IOC_READ, UFFDIO, 0x01, 16);
    /// What a post-copy destination's page thread does with its userfaultfd (the
    /// `pages` filter's): place arrived pages, and let the memory go when all are in.
    pub const UFFD_PAGES: [(u64, &str); 2] = [
        (UFFDIO_COPY, "UFFDIO_COPY"),
        (UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER"),
    ];
    const TUN: u32 = b'T' as u32;
    pub const TUNSETOFFLOAD: u64 = ioctl_expr(_IOC_WRITE, TUN, 208, 4);
    pub const TUNSETVNETHDRSZ: u64 = ioctl_expr(_IOC_WRITE, TUN, 216, 4);
    pub const FIONBIO: u64 = libc::FIONBIO;
}

/// One allow rule: a syscall, optionally with and-bound argument conditions.
struct Rule {
    nr: i64,
    args: Vec<Value>,
    comment: &'static str,
}

fn any(nr: i64) -> Rule {
    Rule {
        nr,
        args: Vec::new(),
        comment: "",
    }
}

/// Argument `index` (32-bit) equals `val`.
pub(super) fn eq32(index: u8, val: u64, comment: &'static str) -> Value {
    json!({"index": index, "type": "dword", "op": "eq", "val": val, "comment": comment})
}

fn when(nr: i64, args: Vec<Value>, comment: &'static str) -> Rule {
    Rule { nr, args, comment }
}

/// What every thread needs: memory management without executable mappings, locks,
/// signal return, clocks, I/O on its own descriptors, thread exit, abort.
fn common() -> Vec<Rule> {
    let no_exec = || {
        json!({"index": 2, "type": "dword", "op": {"masked_eq": libc::PROT_EXEC}, "val": 0,
               "comment": "no PROT_EXEC"})
    };
    let mut v = vec![
        when(libc::SYS_mmap, vec![no_exec()], "no executable mappings"),
        when(
            libc::SYS_mprotect,
            vec![no_exec()],
            "no executable mappings",
        ),
    ];
    v.extend(
        [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_sched_yield,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // The capped console file and stderr: truncate and rewind on compaction.
            libc::SYS_ftruncate,
            libc::SYS_lseek,
        ]
        .map(any),
    );
    for cmd in [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ] {
        v.push(when(
            libc::SYS_fcntl,
            vec![eq32(1, cmd as u64, "fcntl command")],
            "descriptor flags",
        ));
    }
    // glibc gives a thread's stack back when the thread ends, and trims a thread's
    // malloc arena, with MADV_DONTNEED; no other advice (no MADV_REMOVE, MADV_FREE,
    // MADV_HWPOISON, MADV_MERGEABLE, …).
    v.push(when(
        libc::SYS_madvise,
        vec![eq32(2, libc::MADV_DONTNEED as u64, "MADV_DONTNEED")],
        "glibc: a thread's stack at its end, a thread's malloc arena trimmed",
    ));
    // abort() after a panic: raise SIGABRT on itself.
    v.push(when(
        libc::SYS_tgkill,
        vec![eq32(2, libc::SIGABRT as u64, "SIGABRT")],
        "abort",
    ));
    v
}

/// Disk and entropy backends (the event thread; a vCPU runs them too for a queue
/// notify that no ioeventfd caught, and activates devices).
fn device_io() -> Vec<Rule> {
    [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_getrandom,
        libc::SYS_eventfd2,
        libc::SYS_epoll_ctl,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_timerfd_settime,
    ]
    .map(any)
    .into_iter()
    .chain(
        [
            ioctls::TUNSETOFFLOAD,
            ioctls::TUNSETVNETHDRSZ,
            ioctls::FIONBIO,
        ]
        .map(|req| {
            when(
                libc::SYS_ioctl,
                vec![eq32(1, req, "tap offload / vnet header / non-blocking")],
                "net and vsock back-ends",
            )
        }),
    )
    // The balloon gives shared (memfd) guest memory back with MADV_REMOVE (private
    // memory with MADV_DONTNEED, which every thread may use).
    .chain([when(
        libc::SYS_madvise,
        vec![eq32(2, libc::MADV_REMOVE as u64, "MADV_REMOVE")],
        "balloon: reported pages of shared guest memory",
    )])
    .collect()
}

fn main_rules() -> Vec<Rule> {
    let mut v = common();
    v.extend(
        [
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_mincore,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_getrandom,
            libc::SYS_shutdown,
            libc::SYS_rt_sigtimedwait,
            // rate-limit: re-arms a throttled device's timer.
            libc::SYS_timerfd_settime,
            // vsock-reset: the device's connections and listener leave and rejoin the
            // event loop.
            libc::SYS_epoll_ctl,
        ]
        .map(any),
    );
    v.push(when(
        libc::SYS_openat,
        vec![eq32(
            2,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            "O_RDONLY|O_CLOEXEC",
        )],
        "read-only opens (/proc/self/status for metrics)",
    ));
    // snapshot-create: a new directory with new files (never an existing file), and
    // the VM's in-kernel devices read.
    v.push(when(
        libc::SYS_openat,
        vec![eq32(
            2,
            (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC) as u64,
            "O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC",
        )],
        "snapshot files: created, never opened for writing if they exist",
    ));
    v.extend(
        [
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rmdir,
            libc::SYS_pwrite64,
            libc::SYS_fsync,
        ]
        .map(any),
    );
    for (req, name) in ioctls::VM_SAVE {
        v.push(when(libc::SYS_ioctl, vec![eq32(1, req, name)], name));
    }
    // migrate: a connection to the destination (Unix or TCP), with time-outs.
    for (family, name) in [
        (libc::AF_UNIX, "AF_UNIX"),
        (libc::AF_INET, "AF_INET"),
        (libc::AF_INET6, "AF_INET6"),
    ] {
        v.push(when(
            libc::SYS_socket,
            vec![eq32(0, family as u64, name)],
            "migrate: the connection to the destination",
        ));
    }
    v.extend([libc::SYS_connect, libc::SYS_setsockopt].map(any));
    v.push(when(
        libc::SYS_tgkill,
        vec![eq32(
            2,
            crate::vstate::vcpu::kick_signal() as u64,
            "the vCPU kick signal",
        )],
        "kicking vCPU threads out of KVM_RUN",
    ));
    v
}

fn vcpu_rules() -> Vec<Rule> {
    let mut v = common();
    for (req, name) in [
        (ioctls::KVM_RUN, "KVM_RUN"),
        (ioctls::KVM_GET_MP_STATE, "KVM_GET_MP_STATE"),
        (ioctls::KVM_GET_REGS, "KVM_GET_REGS"),
    ]
    .into_iter()
    .chain(ioctls::VCPU_SAVE)
    {
        v.push(when(libc::SYS_ioctl, vec![eq32(1, req, name)], name));
    }
    v.extend(device_io());
    v
}

fn virtio_rules() -> Vec<Rule> {
    let mut v = common();
    v.extend(device_io());
    v.extend(
        [
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_getsockopt,
            libc::SYS_unlink,
        ]
        .map(any),
    );
    v.push(when(
        libc::SYS_socket,
        vec![eq32(0, libc::AF_UNIX as u64, "AF_UNIX")],
        "vsock host side: Unix sockets only",
    ));
    v
}

/// A post-copy destination's page thread (`migration::PostCopy::pull`): it waits on
/// the userfaultfd and the migration connection (poll), reads fault events and frames,
/// asks for pages and answers `DONE` on the connection, places pages and at the end
/// unregisters guest memory. Its connection is the main thread's, duplicated before
/// the thread starts; it opens, creates or connects nothing.
fn pages_rules() -> Vec<Rule> {
    let mut v = common();
    v.extend(
        [
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            // std's HashSet seeds its hasher once per thread.
            libc::SYS_getrandom,
        ]
        .map(any),
    );
    for (req, name) in ioctls::UFFD_PAGES {
        v.push(when(libc::SYS_ioctl, vec![eq32(1, req, name)], name));
    }
    v
}

fn to_json(rules: Vec<Rule>) -> Result<Value, SeccompError> {
    let mut filter = Vec::with_capacity(rules.len());
    for r in rules {
        let name = syscall_name(r.nr).ok_or(SeccompError::Unknown(r.nr))?;
        let mut o = json!({ "syscall": name });
        if !r.args.is_empty() {
            o["args"] = Value::Array(r.args);
        }
        if !r.comment.is_empty() {
            o["comment"] = json!(r.comment);
        }
        filter.push(o);
    }
    Ok(json!({"mismatch_action": "trap", "match_action": "allow", "filter": filter}))
}

/// Adds `write` to fd 2 and `exit_group` to every allow-list that lacks them, so the
/// SIGSYS report can always be written.
pub(crate) fn add_report_syscalls(filter: &mut Value) {
    if filter["match_action"] != "allow" {
        return;
    }
    let Some(rules) = filter["filter"].as_array_mut() else {
        return;
    };
    let rules_of = |rules: &Vec<Value>, name: &str| -> Vec<Value> {
        rules
            .iter()
            .filter(|r| r["syscall"] == name)
            .cloned()
            .collect()
    };
    // An unconditional rule covers everything; conditional ones get one more
    // alternative; none at all gets the narrow one.
    let writes = rules_of(rules, "write");
    if writes.is_empty() || writes.iter().all(|r| r.get("args").is_some()) {
        rules.push(json!({"syscall": "write", "args": [eq32(0, 2, "stderr")],
                          "comment": "the SIGSYS report"}));
    }
    let exits = rules_of(rules, "exit_group");
    if exits.is_empty() || exits.iter().all(|r| r.get("args").is_some()) {
        rules.push(json!({"syscall": "exit_group", "comment": "the SIGSYS report"}));
    }
}

/// The built-in filter set, in seccompiler's JSON format.
pub fn default_filters() -> Result<Value, SeccompError> {
    Ok(json!({
        "main": to_json(main_rules())?,
        "vcpu": to_json(vcpu_rules())?,
        "virtio": to_json(virtio_rules())?,
        "pages": to_json(pages_rules())?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a filter answers instead of trapping, in these tests: an errno no real
    /// call returns.
    const DENIED: i32 = 1234;
    const UFFDIO_API: u64 = 0xc018_aa3f;
    const UFFDIO_REGISTER: u64 = 0xc020_aa00;
    const UFFDIO_WAKE: u64 = 0x8010_aa02;
    const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;

    /// The ioctl rules of filter `kind` (request numbers).
    fn ioctls_of(set: &Value, kind: &str) -> Vec<u64> {
        set[kind]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["syscall"] == "ioctl")
            .map(|r| r["args"][0]["val"].as_u64().unwrap())
            .collect()
    }

    fn has(set: &Value, kind: &str, syscall: &str) -> bool {
        set[kind]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["syscall"] == syscall)
    }

    /// Runs `call` (a raw syscall) on a new thread under the built-in filter of `kind`,
    /// compiled to fail what it does not allow with [`DENIED`] rather than trap:
    /// the call's return value and errno.
    fn under(kind: &str, call: impl FnOnce() -> libc::c_long + Send + 'static) -> (i64, i32) {
        let mut f = default_filters().unwrap()[kind].take();
        f["mismatch_action"] = json!({ "errno": DENIED });
        let mut one = serde_json::Map::new();
        one.insert(kind.to_string(), f);
        let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let text = serde_json::to_vec(&Value::Object(one)).unwrap();
        let prog = seccompiler::compile_from_json(text.as_slice(), arch)
            .unwrap()
            .remove(kind)
            .unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            let r = call();
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            (r, if r < 0 { e } else { 0 })
        })
        .join()
        .unwrap()
    }

    /// `ioctl(-1, req, 0)`: EBADF where the filter allows `req`, [`DENIED`] where not.
    fn ioctl_under(kind: &str, req: u64) -> i32 {
        // SAFETY: an ioctl on no descriptor: it fails, in the filter or with EBADF.
        under(kind, move || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, req, 0)
        })
        .1
    }

    #[test]
    fn userfaultfd_request_numbers_are_the_kernels() {
        assert_eq!(ioctls::UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(ioctls::UFFDIO_UNREGISTER, 0x8010_aa01);
    }

    #[test]
    fn only_the_page_filter_has_userfaultfd_ioctls() {
        let set = default_filters().unwrap();
        let uffd = |req: u64| (req >> 8) & 0xff == u64::from(ioctls::UFFDIO);
        // A VM that is no post-copy destination runs no page thread: its threads'
        // filters allow no userfaultfd ioctl and no new userfaultfd.
        for kind in ["main", "vcpu", "virtio"] {
            let found: Vec<u64> = ioctls_of(&set, kind)
                .into_iter()
                .filter(|&r| uffd(r))
                .collect();
            assert!(found.is_empty(), "{kind}: {found:#x?}");
            assert!(!has(&set, kind, "userfaultfd"), "{kind}");
        }
        // The page thread: placing pages and unregistering, nothing else, and no KVM,
        // tap or other ioctl.
        let mut pages = ioctls_of(&set, "pages");
        pages.sort();
        assert_eq!(pages, [ioctls::UFFDIO_UNREGISTER, ioctls::UFFDIO_COPY]);
        for syscall in [
            "userfaultfd",
            "openat",
            "socket",
            "connect",
            "accept4",
            "bind",
        ] {
            assert!(!has(&set, "pages", syscall), "pages allows {syscall}");
        }
    }

    #[test]
    fn a_vcpu_thread_cannot_place_pages_and_the_page_thread_can_only_place_and_unregister() {
        assert_eq!(ioctl_under("vcpu", ioctls::UFFDIO_COPY), DENIED);
        assert_eq!(ioctl_under("virtio", ioctls::UFFDIO_COPY), DENIED);
        assert_eq!(ioctl_under("main", ioctls::UFFDIO_COPY), DENIED);
        assert_eq!(ioctl_under("main", ioctls::UFFDIO_UNREGISTER), DENIED);
        assert_eq!(ioctl_under("pages", ioctls::UFFDIO_COPY), libc::EBADF);
        assert_eq!(ioctl_under("pages", ioctls::UFFDIO_UNREGISTER), libc::EBADF);
        for req in [
            UFFDIO_API,
            UFFDIO_REGISTER,
            UFFDIO_WAKE,
            UFFDIO_ZEROPAGE,
            ioctls::KVM_RUN,
        ] {
            assert_eq!(ioctl_under("pages", req), DENIED, "{req:#x}");
        }
        // The vCPU filter still lets KVM_RUN through (so the denials above are the
        // filter's, not a broken test set-up).
        assert_eq!(ioctl_under("vcpu", ioctls::KVM_RUN), libc::EBADF);
        for kind in ["main", "vcpu", "virtio", "pages"] {
            let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
            // SAFETY: a raw userfaultfd call; a descriptor it might return is closed.
            let (fd, e) = under(kind, move || unsafe {
                libc::syscall(libc::SYS_userfaultfd, flags)
            });
            if fd >= 0 {
                // SAFETY: the descriptor just returned, owned by nothing else.
                unsafe { libc::close(fd as i32) };
            }
            assert_eq!(e, DENIED, "{kind}: userfaultfd gave {fd}");
        }
    }

    #[test]
    fn madvise_is_allowed_with_dontneed_only_and_remove_for_the_balloon() {
        let set = default_filters().unwrap();
        for kind in super::super::THREAD_KINDS {
            let rules: Vec<&Value> = set[kind]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["syscall"] == "madvise")
                .collect();
            // The threads that run device back-ends may also remove shared pages.
            let devices = matches!(kind, "vcpu" | "virtio");
            assert_eq!(rules.len(), 1 + usize::from(devices), "{kind}");
            assert_eq!(rules[0]["args"][0]["index"], 2, "{kind}");
            assert_eq!(rules[0]["args"][0]["val"], libc::MADV_DONTNEED, "{kind}");
            if devices {
                assert_eq!(rules[1]["args"][0]["val"], libc::MADV_REMOVE, "{kind}");
            }
            // An unaligned address: an allowed call fails with EINVAL and touches nothing.
            let advise = |advice: i32| {
                // SAFETY: madvise of no memory (length 0, unaligned): it only fails.
                under(kind, move || unsafe {
                    libc::syscall(libc::SYS_madvise, 1usize, 0usize, advice)
                })
                .1
            };
            assert_eq!(advise(libc::MADV_DONTNEED), libc::EINVAL, "{kind}");
            if devices {
                assert_eq!(advise(libc::MADV_REMOVE), libc::EINVAL, "{kind}");
            } else {
                assert_eq!(advise(libc::MADV_REMOVE), DENIED, "{kind}");
            }
            for advice in [libc::MADV_FREE, libc::MADV_MERGEABLE] {
                assert_eq!(advise(advice), DENIED, "{kind}: advice {advice}");
            }
        }
    }
}
