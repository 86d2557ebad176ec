//! nestor's seccomp compiler against libseccomp: a random OCI profile (a few syscalls, every
//! action, argument conditions with every operator) is compiled by
//! `nestor_container::seccomp::compile` and, rule by rule, by libseccomp 2.5
//! (`seccomp_init`, `seccomp_rule_add_array`, `seccomp_export_bpf`), as runc and crun load
//! it. Both BPF programs are then run by a small classic-BPF interpreter on random
//! `seccomp_data` (x86_64, the profile's syscalls and neighbours, arguments near the rules'
//! values) and must return the same action.
//!
//! Inputs where the two are documented to differ are not compared: a rule libseccomp
//! refuses (two conditions on one argument, a rule with the default action, errno 4095,
//! which nestor accepts as the kernel does), and a call
//! for which two conditional rules of one syscall with different actions both hold (the
//! divergence the compiler's module doc names). Invariants: nestor compiles every profile
//! libseccomp accepts, never panics, and decides every compared call as libseccomp does.
#![no_main]

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nestor_container::seccomp::{compile, parse_json};

#[repr(C)]
struct ScmpArgCmp {
    arg: c_uint,
    op: c_int,
    datum_a: u64,
    datum_b: u64,
}

#[link(name = "seccomp")]
extern "C" {
    fn seccomp_init(def_action: u32) -> *mut c_void;
    fn seccomp_release(ctx: *mut c_void);
    fn seccomp_syscall_resolve_name(name: *const c_char) -> c_int;
    fn seccomp_rule_add_array(
        ctx: *mut c_void,
        action: u32,
        syscall: c_int,
        arg_cnt: c_uint,
        arg_array: *const ScmpArgCmp,
    ) -> c_int;
    fn seccomp_export_bpf(ctx: *const c_void, fd: c_int) -> c_int;
}

/// A few syscalls with neighbours in number, so the binary search's edges are exercised.
const SYSCALLS: &[&str] = &[
    "read",
    "write",
    "open",
    "close",
    "mmap",
    "ioctl",
    "getpid",
    "clone",
    "personality",
    "futex",
    "openat",
    "exit_group",
    "socket",
    "kill",
    "prctl",
    "bpf",
];

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Act {
    Allow,
    Errno(u16),
    KillProcess,
    KillThread,
    Trap,
    Log,
    Trace(u16),
}

impl Act {
    fn errno(self) -> Option<u32> {
        match self {
            Act::Errno(e) | Act::Trace(e) => Some(u32::from(e) % 4096),
            _ => None,
        }
    }
    fn oci(self) -> &'static str {
        match self {
            Act::Allow => "SCMP_ACT_ALLOW",
            Act::Errno(_) => "SCMP_ACT_ERRNO",
            Act::KillProcess => "SCMP_ACT_KILL_PROCESS",
            Act::KillThread => "SCMP_ACT_KILL_THREAD",
            Act::Trap => "SCMP_ACT_TRAP",
            Act::Log => "SCMP_ACT_LOG",
            Act::Trace(_) => "SCMP_ACT_TRACE",
        }
    }
    /// libseccomp's (and the kernel's) return value.
    fn scmp(self) -> u32 {
        match self {
            Act::Allow => 0x7fff_0000,
            Act::Errno(_) => 0x0005_0000 | self.errno().unwrap_or(0),
            Act::KillProcess => 0x8000_0000,
            Act::KillThread => 0,
            Act::Trap => 0x0003_0000,
            Act::Log => 0x7ffc_0000,
            Act::Trace(_) => 0x7ff0_0000 | self.errno().unwrap_or(0),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Cond {
    index: u8,
    op: u8,
    value: u64,
    value_two: u64,
}

impl Cond {
    fn index(&self) -> u32 {
        u32::from(self.index % 6)
    }
    /// OCI name and libseccomp number of the operator.
    fn op(&self) -> (&'static str, c_int) {
        match self.op % 7 {
            0 => ("SCMP_CMP_NE", 1),
            1 => ("SCMP_CMP_LT", 2),
            2 => ("SCMP_CMP_LE", 3),
            3 => ("SCMP_CMP_EQ", 4),
            4 => ("SCMP_CMP_GE", 5),
            5 => ("SCMP_CMP_GT", 6),
            _ => ("SCMP_CMP_MASKED_EQ", 7),
        }
    }
    /// valueTwo as generated, bits outside the mask included (both sides mask it).
    fn value_two(&self) -> u64 {
        self.value_two
    }
    /// A MASKED_EQ with mask 0 always holds: libseccomp drops it, and so does nestor.
    fn always(&self) -> bool {
        self.op % 7 == 6 && self.value == 0
    }
    fn holds(&self, args: &[u64; 6]) -> bool {
        let a = args[self.index() as usize];
        let v = self.value;
        match self.op % 7 {
            0 => a != v,
            1 => a < v,
            2 => a <= v,
            3 => a == v,
            4 => a >= v,
            5 => a > v,
            _ => a & v == self.value_two & v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Rule {
    syscalls: Vec<u8>,
    action: Act,
    conds: Vec<Cond>,
}

#[derive(Arbitrary, Debug)]
struct Call {
    syscall: u8,
    /// Per argument: a rule value (selected by the byte) or the random value itself.
    args: [(u8, u64); 6],
}

#[derive(Arbitrary, Debug)]
struct Input {
    default: Act,
    rules: Vec<Rule>,
    calls: Vec<Call>,
}

/// Runs a classic BPF seccomp program on `struct seccomp_data`.
fn run_bpf(prog: &[libc::sock_filter], nr: i32, arch: u32, args: &[u64; 6]) -> u32 {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&nr.to_ne_bytes());
    data.extend_from_slice(&arch.to_ne_bytes());
    data.extend_from_slice(&0u64.to_ne_bytes());
    for a in args {
        data.extend_from_slice(&a.to_ne_bytes());
    }
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    loop {
        let ins = prog.get(pc).expect("the program ran off its end");
        pc += 1;
        let k = ins.k;
        let class = ins.code & 0x07;
        match class {
            // BPF_LD
            0x00 => match ins.code & 0xe0 {
                0x20 => {
                    let off = k as usize;
                    assert!(off % 4 == 0 && off + 4 <= data.len(), "bad load {off}");
                    a = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap());
                }
                0x60 => a = mem[k as usize],
                0x00 => a = k,
                0x80 => a = data.len() as u32,
                m => panic!("unsupported ld mode {m:#x}"),
            },
            // BPF_LDX
            0x01 => match ins.code & 0xe0 {
                0x60 => x = mem[k as usize],
                0x00 => x = k,
                0x80 => x = data.len() as u32,
                m => panic!("unsupported ldx mode {m:#x}"),
            },
            0x02 => mem[k as usize] = a,
            0x03 => mem[k as usize] = x,
            // BPF_ALU
            0x04 => {
                let src = if ins.code & 0x08 != 0 { x } else { k };
                a = match ins.code & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x30 => a / src,
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.wrapping_shl(src),
                    0x70 => a.wrapping_shr(src),
                    0x80 => a.wrapping_neg(),
                    0x90 => a % src,
                    0xa0 => a ^ src,
                    o => panic!("unsupported alu op {o:#x}"),
                };
            }
            // BPF_JMP
            0x05 => {
                let src = if ins.code & 0x08 != 0 { x } else { k };
                let op = ins.code & 0xf0;
                if op == 0x00 {
                    pc += k as usize;
                    continue;
                }
                let taken = match op {
                    0x10 => a == src,
                    0x20 => a > src,
                    0x30 => a >= src,
                    0x40 => a & src != 0,
                    o => panic!("unsupported jmp op {o:#x}"),
                };
                pc += usize::from(if taken { ins.jt } else { ins.jf });
            }
            // BPF_RET
            0x06 => {
                return match ins.code & 0x18 {
                    0x10 => a,
                    _ => k,
                }
            }
            // BPF_MISC
            _ => {
                if ins.code & 0xf8 == 0 {
                    x = a;
                } else {
                    a = x;
                }
            }
        }
    }
}

/// libseccomp's program for the profile, built in a child process given 2 s: libseccomp 2.5
/// spins for minutes in `seccomp_rule_add_array` on some sets of rules of one syscall with
/// range comparisons (seen: two `openat` rules with LE and EQ conditions). None when
/// libseccomp refuses a rule or runs out of time.
fn libseccomp_program_bounded(
    input: &Input,
    rules: &[(Vec<i32>, Act, Vec<Cond>)],
) -> Option<Vec<libc::sock_filter>> {
    // SAFETY: fork in a single-threaded fuzzer; the child only computes, writes to the memfd
    // and _exits; the parent reaps it.
    unsafe {
        let fd = libc::memfd_create(c"scmp-out".as_ptr(), 0);
        assert!(fd >= 0, "memfd_create");
        let mut file = std::fs::File::from_raw_fd(fd);
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // A libseccomp crash or time-out ends the child only (libFuzzer's handlers would
            // report it as the target's): seen once in a 420 s run, not reproducible.
            for sig in [
                libc::SIGALRM,
                libc::SIGSEGV,
                libc::SIGABRT,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            libc::alarm(2);
            let code = match libseccomp_program(input, rules) {
                Some(prog) => {
                    let bytes: Vec<u8> = prog
                        .iter()
                        .flat_map(|i| {
                            let mut b = [0u8; 8];
                            b[..2].copy_from_slice(&i.code.to_ne_bytes());
                            b[2] = i.jt;
                            b[3] = i.jf;
                            b[4..].copy_from_slice(&i.k.to_ne_bytes());
                            b
                        })
                        .collect();
                    libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                    0
                }
                None => 3,
            };
            libc::_exit(code);
        }
        // libFuzzer's timer (SIGALRM every second or so) interrupts waitpid: an EINTR
        // left `status` at 0, read as a clean exit, and an empty program was compared
        // (a run under load "ran off its end").
        let mut status = 0;
        let reaped = loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break r;
        };
        if reaped != pid || !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            return None;
        }
        file.rewind().unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        Some(
            bytes
                .chunks_exact(8)
                .map(|c| libc::sock_filter {
                    code: u16::from_ne_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect(),
        )
    }
}

/// libseccomp's program for the profile, or None when libseccomp refuses a rule.
fn libseccomp_program(
    input: &Input,
    rules: &[(Vec<i32>, Act, Vec<Cond>)],
) -> Option<Vec<libc::sock_filter>> {
    // SAFETY: plain libseccomp calls on a context this function owns and releases; the
    // argument array outlives the call that reads it.
    unsafe {
        let ctx = seccomp_init(input.default.scmp());
        // libseccomp 2.5 refuses errno 4095 (it takes 0..=4094), which the kernel and nestor
        // accept: not compared.
        if ctx.is_null() {
            return None;
        }
        let mut ok = true;
        for (nrs, action, conds) in rules {
            let cmps: Vec<ScmpArgCmp> = conds
                .iter()
                .map(|c| {
                    let (_, op) = c.op();
                    let (a, b) = if op == 7 {
                        (c.value, c.value_two())
                    } else {
                        (c.value, 0)
                    };
                    ScmpArgCmp {
                        arg: c.index(),
                        op,
                        datum_a: a,
                        datum_b: b,
                    }
                })
                .collect();
            for &nr in nrs {
                let rc = seccomp_rule_add_array(
                    ctx,
                    action.scmp(),
                    nr,
                    cmps.len() as c_uint,
                    cmps.as_ptr(),
                );
                if rc != 0 {
                    ok = false;
                }
            }
        }
        let prog = ok.then(|| {
            let fd = libc::memfd_create(c"scmp".as_ptr(), 0);
            assert!(fd >= 0, "memfd_create");
            let mut file = std::fs::File::from_raw_fd(fd);
            assert_eq!(
                seccomp_export_bpf(ctx, file.as_raw_fd()),
                0,
                "seccomp_export_bpf"
            );
            file.rewind().unwrap();
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).unwrap();
            bytes
                .chunks_exact(8)
                .map(|c| libc::sock_filter {
                    code: u16::from_ne_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect()
        });
        seccomp_release(ctx);
        prog
    }
}

fn nr_of(name: &str) -> i32 {
    let c = CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name; libseccomp only reads it.
    unsafe { seccomp_syscall_resolve_name(c.as_ptr()) }
}

fuzz_target!(|input: Input| {
    if input.rules.len() > 8 || input.calls.len() > 16 {
        return;
    }
    // The profile as OCI JSON, and the same rules for libseccomp. libseccomp refuses a rule
    // whose action is the default one and two conditions on one argument; such rules are
    // left out of both (nestor ignores the first kind and ANDs the second, see its doc).
    let mut json_rules = Vec::new();
    let mut rules = Vec::new();
    // libseccomp 2.5's rule tree grows exponentially with conditional rules on one
    // syscall (an input with ~20 took over 20 s in seccomp_rule_add_array): at most 4 each.
    let mut per_syscall = [0u8; SYSCALLS.len()];
    for r in &input.rules {
        if r.action == input.default
            || r.syscalls.is_empty()
            || r.syscalls.len() > 3
            || r.conds.len() > 3
        {
            continue;
        }
        // libseccomp 2.5 spins (minutes, in seccomp_rule_add_array) on two rules of one
        // syscall that each have two or more non-EQ comparisons (NE, LT, LE, GE, GT) besides
        // others: at most one non-EQ, non-MASKED_EQ comparison per rule.
        if r.conds
            .iter()
            .filter(|c| c.op % 7 <= 5 && c.op % 7 != 3)
            .count()
            > 1
        {
            continue;
        }
        let mut seen = [false; 6];
        if r.conds
            .iter()
            .any(|c| std::mem::replace(&mut seen[c.index() as usize], true))
        {
            continue;
        }
        let names: Vec<&str> = r
            .syscalls
            .iter()
            .map(|&s| SYSCALLS[usize::from(s) % SYSCALLS.len()])
            .collect();
        if r.syscalls
            .iter()
            .any(|&s| per_syscall[usize::from(s) % SYSCALLS.len()] >= 4)
        {
            continue;
        }
        for &s in &r.syscalls {
            per_syscall[usize::from(s) % SYSCALLS.len()] += 1;
        }
        let args: Vec<serde_json::Value> = r
            .conds
            .iter()
            .map(|c| {
                let mut v =
                    serde_json::json!({"index": c.index(), "value": c.value, "op": c.op().0});
                if c.op % 7 == 6 {
                    v["valueTwo"] = c.value_two().into();
                }
                v
            })
            .collect();
        let mut rule = serde_json::json!({"names": names, "action": r.action.oci(), "args": args});
        if let Some(e) = r.action.errno() {
            rule["errnoRet"] = e.into();
        }
        json_rules.push(rule);
        rules.push((
            names.iter().map(|n| nr_of(n)).collect::<Vec<_>>(),
            r.action,
            r.conds.clone(),
        ));
    }
    let mut profile = serde_json::json!({
        "defaultAction": input.default.oci(),
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": json_rules,
    });
    if let Some(e) = input.default.errno() {
        profile["defaultErrnoRet"] = e.into();
    }
    let spec = parse_json(&profile.to_string()).expect("the generated profile parses");
    if std::env::var_os("SECCOMP_FUZZ_PRINT").is_some() {
        eprintln!("{profile}");
    }
    let Some(theirs) = libseccomp_program_bounded(&input, &rules) else {
        return;
    };
    let ours = compile(&spec)
        .unwrap_or_else(|e| panic!("libseccomp accepts what nestor refuses: {e}\n{profile}"));
    let ours = ours.program();

    let values: Vec<u64> = rules
        .iter()
        .flat_map(|r| r.2.iter())
        .flat_map(|c| {
            [
                c.value,
                c.value_two,
                c.value_two & c.value,
                c.value.wrapping_add(1),
                c.value.wrapping_sub(1),
            ]
        })
        .collect();
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    for call in &input.calls {
        let nr = nr_of(SYSCALLS[usize::from(call.syscall) % SYSCALLS.len()])
            + i32::from(call.syscall / 64)
            - 2;
        let nr = nr.max(0);
        let mut args = [0u64; 6];
        for (i, (pick, raw)) in call.args.iter().enumerate() {
            args[i] = if values.is_empty() || pick % 4 == 0 {
                *raw
            } else {
                values[usize::from(*pick) % values.len()]
            };
        }
        // The documented divergence: two conditional rules of this syscall with different
        // actions both hold.
        let mine: Vec<&(Vec<i32>, Act, Vec<Cond>)> =
            rules.iter().filter(|r| r.0.contains(&nr)).collect();
        // A rule whose conditions all always hold is unconditional (the first one decides).
        if !mine.iter().any(|r| r.2.iter().all(Cond::always)) {
            let holding: Vec<Act> = mine
                .iter()
                .filter(|r| r.2.iter().all(|c| c.holds(&args)))
                .map(|r| r.1)
                .collect();
            if holding.windows(2).any(|w| w[0] != w[1]) {
                continue;
            }
        }
        let a = run_bpf(ours, nr, AUDIT_ARCH_X86_64, &args);
        let b = run_bpf(&theirs, nr, AUDIT_ARCH_X86_64, &args);
        assert_eq!(
            a, b,
            "nestor {a:#x} vs libseccomp {b:#x} for nr {nr} args {args:x?}\nprofile {profile}"
        );
    }
});
