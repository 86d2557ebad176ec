//! Seccomp for containers: owns turning an OCI `linux.seccomp` section into classic BPF
//! programs (compiled with `seccompiler`, in the parent, before fork) and installing them
//! in the container's init process (bare `seccomp(2)` calls, nothing else, in the child).
//!
//! # How OCI semantics map onto filters
//!
//! The kernel runs every installed filter on every syscall and keeps the most restrictive
//! result (KILL_PROCESS > KILL_THREAD > TRAP > ERRNO > USER_NOTIF > TRACE > LOG > ALLOW; for the
//! same action with different data, the most recently installed filter wins). A
//! `seccompiler` filter has one action for matching syscalls and one for the rest, so a
//! profile becomes a small set of filters whose combination is the profile:
//!
//! 1. **Rule resolution** (what libseccomp, and so runc and crun, do with the same rules):
//!    syscall names are resolved for x86_64 (names the table does not know, e.g. syscalls of
//!    newer kernels or of other architectures, are skipped with a debug line); a rule whose
//!    action equals the default action is dropped (libseccomp refuses it with `EACCES`, and
//!    runc/crun ignore that); for each syscall, the first rule *without* argument conditions
//!    decides the syscall on its own and every other rule for it is ignored (libseccomp keeps
//!    the first unconditional rule and silently drops the rest, conditional or not);
//!    otherwise the syscall keeps its conditional rules in spec order.
//! 2. **One filter per distinct non-ALLOW action** (action + errno/trace data): it returns
//!    that action for the syscalls and argument conditions of the rules with that action,
//!    and ALLOW for everything else.
//! 3. **One default filter**, when the default action is not ALLOW: it returns ALLOW for every
//!    syscall (and argument condition) named by any surviving rule, and the default action
//!    for everything else.
//!
//! For a syscall whose rules do not overlap (every rule of podman's default profile), exactly
//! one filter returns something other than ALLOW, so the combined result is exactly the
//! rule's action, or the default action when no rule matches. **Divergence:** when two
//! conditional rules of the *same syscall* with *different* actions both match one call,
//! the kernel's precedence picks the more restrictive action (ties between two ERRNO
//! values go to the rule that appears first in the spec), whereas libseccomp's result
//! depends on its internal argument tree. Argument comparisons are 64-bit (as libseccomp's
//! on x86_64); several conditions in one rule must all hold, also when they name the same
//! argument (libseccomp 2.5 refuses that; runc ORs them).
//!
//! Podman's default profile thus becomes three filters: the default ERRNO(ENOSYS) filter with
//! its allow-list, ERRNO(EPERM) and ERRNO(EINVAL). Syscalls that every filter allows
//! without looking at their arguments are served by the kernel's seccomp action cache, so
//! the filters cost nothing on the container's common syscalls.
//!
//! # Architectures
//!
//! Rules are compiled for the native x86_64 ABI only, which is always included (as
//! libseccomp's native architecture is). Every filter kills the process (KILL_PROCESS,
//! SIGSYS) for a syscall of another ABI: i386 (`int 0x80`, `AUDIT_ARCH_I386`) and x32
//! (x86_64 syscall numbers with bit 30 set, except -1 which a tracer uses to skip a
//! syscall). `SCMP_ARCH_X86`/`SCMP_ARCH_X32` and foreign architectures in `architectures`
//! are accepted and only logged at debug level. **Divergence:** with runc/crun, a listed
//! `SCMP_ARCH_X86` lets 32-bit programs run under the same rules; under nestor they get
//! SIGSYS on their first syscall.
//!
//! # Actions and flags
//!
//! `SCMP_ACT_KILL` and `SCMP_ACT_KILL_THREAD` kill the thread, `SCMP_ACT_KILL_PROCESS` the
//! process; `SCMP_ACT_ERRNO` and `SCMP_ACT_TRACE` take `errnoRet` (default EPERM, at most
//! 4095), and `errnoRet` on any other action is an error, as the runtime spec demands.
//! `SCMP_ACT_NOTIFY` (a seccomp agent over `listenerPath`) is refused with
//! [`SeccompError::UnsupportedAction`]. The flags `SECCOMP_FILTER_FLAG_LOG`, `_SPEC_ALLOW`
//! and `_TSYNC` are passed to every `seccomp(2)` call.
//!
//! # Installing
//!
//! [`CompiledSeccomp::install`] needs either `no_new_privs` set on the calling thread or
//! `CAP_SYS_ADMIN` in its user namespace (the kernel's rule; `EACCES` otherwise, reported as
//! [`SeccompError::NotPermitted`]). It does not set `no_new_privs` itself: that is the spec's
//! `process.noNewPrivileges`, the caller's decision. Every syscall the caller makes after
//! installing (e.g. dropping capabilities, `execve`) goes through the filters, so install last.
//! A failure after the first filter leaves the earlier ones installed (filters cannot be
//! removed): the caller must then exit.

use std::fmt;
use std::io;
use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use syscalls::Sysno;

/// Largest errno the kernel returns from SECCOMP_RET_ERRNO (`MAX_ERRNO`).
const MAX_ERRNO: u32 = 4095;
/// Syscalls take at most six arguments, numbered 0 to 5.
const MAX_ARG_INDEX: usize = 5;
/// Kernel limit on the length of one classic BPF program (`BPF_MAXINSNS`).
const BPF_MAXINSNS: usize = 4096;
/// x86_64 syscall numbers with this bit set are x32 ABI syscalls.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes (linux/bpf_common.h) for the x32 guard this module adds.
/// BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// Offset of `nr` in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;

/// Errors from compiling or installing a seccomp profile. Every compile error names the
/// rule it comes from (`defaultAction` or `syscalls[INDEX] (NAMES)`).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The seccomp JSON does not parse as an OCI `linux.seccomp` object.
    #[error("seccomp {rule}: {source}")]
    Parse {
        /// The rule that failed to parse, or `the profile`.
        rule: String,
        /// serde's description (names the bad value and its line and column).
        source: serde_json::Error,
    },
    /// An action nestor does not implement (`SCMP_ACT_NOTIFY`).
    #[error(
        "seccomp {rule}: action {action} is not supported by nestor (no seccomp agent support)"
    )]
    UnsupportedAction {
        /// The offending rule.
        rule: String,
        /// The action as written in the spec.
        action: String,
    },
    /// `errnoRet` given for an action that returns no errno.
    #[error("seccomp {rule}: errnoRet is only valid with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, not with {action}")]
    ErrnoNotAllowed {
        /// The offending rule.
        rule: String,
        /// The action as written in the spec.
        action: String,
    },
    /// `errnoRet` larger than the kernel can return.
    #[error("seccomp {rule}: errnoRet {value} is out of range (0 to 4095)")]
    ErrnoOutOfRange {
        /// The offending rule.
        rule: String,
        /// The value found.
        value: u32,
    },
    /// An argument condition names an argument a syscall cannot have.
    #[error(
        "seccomp {rule}: argument index {index} is out of range (syscall arguments are 0 to 5)"
    )]
    ArgIndex {
        /// The offending rule.
        rule: String,
        /// The index found.
        index: usize,
    },
    /// seccompiler could not build a BPF program (e.g. too many instructions).
    #[error("seccomp: cannot build the filter for {what}: {detail}")]
    Build {
        /// Which filter (`default action ...` or the action of the filter).
        what: String,
        /// seccompiler's or this module's description.
        detail: String,
    },
    /// The kernel refused the filter with `EACCES`.
    #[error("seccomp: installing filter {index} of {total} refused (EACCES): the process needs no_new_privs set or CAP_SYS_ADMIN")]
    NotPermitted {
        /// 1-based index of the refused filter.
        index: usize,
        /// Number of filters of the profile.
        total: usize,
    },
    /// Any other `seccomp(2)` failure.
    #[error("seccomp: installing filter {index} of {total} failed: {source}")]
    Install {
        /// 1-based index of the failed filter.
        index: usize,
        /// Number of filters of the profile.
        total: usize,
        /// The kernel's error.
        source: io::Error,
    },
}

/// A compiled profile: one or more BPF programs and the `seccomp(2)` flags, ready to
/// install with no allocation and no syscall besides `seccomp(2)`.
#[derive(Clone)]
pub struct CompiledSeccomp {
    /// Programs in installation order.
    programs: Vec<Vec<libc::sock_filter>>,
    /// SECCOMP_FILTER_FLAG_* bits for every `seccomp(2)` call.
    flags: libc::c_ulong,
}

impl fmt::Debug for CompiledSeccomp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lens: Vec<usize> = self.programs.iter().map(Vec::len).collect();
        f.debug_struct("CompiledSeccomp")
            .field("program_lengths", &lens)
            .field("flags", &self.flags)
            .finish()
    }
}

impl CompiledSeccomp {
    /// Installs the filters on the calling thread, in order. Needs `no_new_privs` or
    /// `CAP_SYS_ADMIN` (see the module doc); makes only `seccomp(2)` calls and allocates
    /// nothing, so it is safe between `fork` and `exec`.
    pub fn install(&self) -> Result<(), SeccompError> {
        let total = self.programs.len();
        for (i, program) in self.programs.iter().enumerate() {
            let fprog = libc::sock_fprog {
                // compile() guarantees len <= BPF_MAXINSNS, which fits in u16.
                len: program.len() as libc::c_ushort,
                filter: program.as_ptr().cast_mut(),
            };
            // SAFETY: `fprog` points to a live, correctly sized program; the kernel copies it
            // and keeps no reference to our memory.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    self.flags,
                    &fprog as *const libc::sock_fprog,
                )
            };
            if rc != 0 {
                let err = if rc > 0 {
                    // TSYNC: rc is the id of a thread that could not be synchronized.
                    io::Error::other("another thread could not be synchronized (TSYNC)")
                } else {
                    io::Error::last_os_error()
                };
                if err.raw_os_error() == Some(libc::EACCES) {
                    return Err(SeccompError::NotPermitted {
                        index: i + 1,
                        total,
                    });
                }
                return Err(SeccompError::Install {
                    index: i + 1,
                    total,
                    source: err,
                });
            }
        }
        Ok(())
    }

    /// Number of BPF programs (one `seccomp(2)` call each).
    pub fn filter_count(&self) -> usize {
        self.programs.len()
    }

    /// Total number of BPF instructions over all programs.
    pub fn instruction_count(&self) -> usize {
        self.programs.iter().map(Vec::len).sum()
    }
}

/// Parses the JSON of an OCI `linux.seccomp` object; on failure the error names the rule
/// (`syscalls[INDEX] (NAMES)`) that does not parse, e.g. for an unknown action or operator.
pub fn parse_json(json: &str) -> Result<LinuxSeccomp, SeccompError> {
    serde_json::from_str(json).map_err(|source| SeccompError::Parse {
        rule: locate_unparsable_rule(json).unwrap_or_else(|| "profile".to_string()),
        source,
    })
}

/// Finds the first entry of `syscalls` that does not deserialize on its own.
fn locate_unparsable_rule(json: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let syscalls = value.get("syscalls")?.as_array()?;
    syscalls.iter().enumerate().find_map(|(i, entry)| {
        serde_json::from_value::<LinuxSyscall>(entry.clone())
            .err()
            .map(|_| {
                let names: Vec<String> = entry
                    .get("names")
                    .and_then(|n| n.as_array())
                    .map(|n| {
                        n.iter()
                            .map(|s| s.as_str().unwrap_or("?").to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                rule_label(i, &names)
            })
    })
}

/// `syscalls[3] (mkdir, rmdir)`, with at most four names.
fn rule_label(index: usize, names: &[String]) -> String {
    let mut shown = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 4 {
        shown.push_str(", ...");
    }
    format!("syscalls[{index}] ({shown})")
}

/// What a filter returns, with the data (errno, trace message) resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    KillProcess,
    KillThread,
    Trap,
    Errno(u32),
    Trace(u32),
    Log,
    Allow,
}

impl Action {
    fn from_spec(
        action: LinuxSeccompAction,
        errno_ret: Option<u32>,
        rule: &dyn Fn() -> String,
    ) -> Result<Self, SeccompError> {
        let takes_errno = matches!(
            action,
            LinuxSeccompAction::ScmpActErrno | LinuxSeccompAction::ScmpActTrace
        );
        if errno_ret.is_some() && !takes_errno {
            return Err(SeccompError::ErrnoNotAllowed {
                rule: rule(),
                action: action.to_string(),
            });
        }
        let data = errno_ret.unwrap_or(libc::EPERM as u32);
        if data > MAX_ERRNO {
            return Err(SeccompError::ErrnoOutOfRange {
                rule: rule(),
                value: data,
            });
        }
        Ok(match action {
            LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
                Self::KillThread
            }
            LinuxSeccompAction::ScmpActKillProcess => Self::KillProcess,
            LinuxSeccompAction::ScmpActTrap => Self::Trap,
            LinuxSeccompAction::ScmpActErrno => Self::Errno(data),
            LinuxSeccompAction::ScmpActTrace => Self::Trace(data),
            LinuxSeccompAction::ScmpActLog => Self::Log,
            LinuxSeccompAction::ScmpActAllow => Self::Allow,
            LinuxSeccompAction::ScmpActNotify => {
                return Err(SeccompError::UnsupportedAction {
                    rule: rule(),
                    action: action.to_string(),
                })
            }
        })
    }

    fn to_seccompiler(self) -> SeccompAction {
        match self {
            Self::KillProcess => SeccompAction::KillProcess,
            Self::KillThread => SeccompAction::KillThread,
            Self::Trap => SeccompAction::Trap,
            Self::Errno(e) => SeccompAction::Errno(e),
            Self::Trace(t) => SeccompAction::Trace(t),
            Self::Log => SeccompAction::Log,
            Self::Allow => SeccompAction::Allow,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KillProcess => f.write_str("SCMP_ACT_KILL_PROCESS"),
            Self::KillThread => f.write_str("SCMP_ACT_KILL_THREAD"),
            Self::Trap => f.write_str("SCMP_ACT_TRAP"),
            Self::Errno(e) => write!(f, "SCMP_ACT_ERRNO({e})"),
            Self::Trace(t) => write!(f, "SCMP_ACT_TRACE({t})"),
            Self::Log => f.write_str("SCMP_ACT_LOG"),
            Self::Allow => f.write_str("SCMP_ACT_ALLOW"),
        }
    }
}

/// One spec rule for one syscall: its conditions (empty: unconditional) and action.
#[derive(Clone)]
struct Rule {
    conditions: Vec<SeccompCondition>,
    action: Action,
    /// Index of the spec rule, for debug lines.
    origin: usize,
}

/// Syscall number -> seccompiler rules (an empty list matches the syscall unconditionally).
type RuleMap = std::collections::BTreeMap<i64, Vec<SeccompRule>>;

/// Compiles an OCI seccomp profile into BPF programs for x86_64 (see the module doc for the
/// mapping). Pure computation: call it in the parent, before forking the container.
pub fn compile(spec: &LinuxSeccomp) -> Result<CompiledSeccomp, SeccompError> {
    let default = Action::from_spec(spec.default_action(), spec.default_errno_ret(), &|| {
        "defaultAction".to_string()
    })?;
    check_architectures(spec.architectures().as_deref().unwrap_or(&[]));
    let flags = spec
        .flags()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .fold(0, |acc, flag| {
            acc | match flag {
                LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
                LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
                LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                    libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
                }
            }
        });

    // Step 1: every (syscall, rule) pair, in spec order, minus default-action rules.
    let mut per_syscall: std::collections::BTreeMap<i64, Vec<Rule>> = Default::default();
    for (index, syscall) in spec.syscalls().as_deref().unwrap_or(&[]).iter().enumerate() {
        let label = || rule_label(index, syscall.names());
        let action = Action::from_spec(syscall.action(), syscall.errno_ret(), &label)?;
        let conditions = syscall
            .args()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|arg| condition(arg, &label))
            .collect::<Result<Vec<_>, _>>()?;
        if action == default {
            tracing::debug!(rule = %label(), "seccomp rule has the default action; ignored");
            continue;
        }
        for name in syscall.names() {
            let Ok(sysno) = Sysno::from_str(name) else {
                tracing::debug!(rule = %label(), syscall = %name, "unknown syscall on x86_64; skipped");
                continue;
            };
            per_syscall
                .entry(sysno.id() as i64)
                .or_default()
                .push(Rule {
                    conditions: conditions.clone(),
                    action,
                    origin: index,
                });
        }
    }

    // Step 2: per syscall, the first unconditional rule wins outright (libseccomp's rule).
    // Step 3: distribute the surviving rules over the per-action filters and the default one.
    let mut default_allow = RuleMap::new();
    // (action, rules) in order of first appearance in the spec.
    let mut by_action: Vec<(Action, RuleMap)> = Vec::new();
    for (nr, rules) in per_syscall {
        let effective = match rules.iter().find(|r| r.conditions.is_empty()) {
            Some(unconditional) => {
                for other in rules.iter().filter(|r| r.origin != unconditional.origin) {
                    tracing::debug!(
                        syscall = nr,
                        kept = %unconditional.action,
                        kept_rule = unconditional.origin,
                        ignored = %other.action,
                        ignored_rule = other.origin,
                        "seccomp: an earlier unconditional rule decides this syscall"
                    );
                }
                vec![unconditional.clone()]
            }
            None => rules,
        };
        for rule in effective {
            if default != Action::Allow {
                push_rule(&mut default_allow, nr, &rule)?;
            }
            if rule.action != Action::Allow {
                let slot = match by_action.iter().position(|(a, _)| *a == rule.action) {
                    Some(slot) => slot,
                    None => {
                        by_action.push((rule.action, RuleMap::new()));
                        by_action.len() - 1
                    }
                };
                push_rule(&mut by_action[slot].1, nr, &rule)?;
            }
        }
    }

    // Installation order: the default filter first, then the action filters in reverse
    // order of appearance, so that the first-listed action wins a tie of equal precedence
    // (the most recently installed filter wins ties).
    let mut filters: Vec<(String, SeccompFilter)> = Vec::new();
    if default != Action::Allow {
        filters.push((
            format!("default action {default}"),
            build_filter(default_allow, default, Action::Allow)?,
        ));
    }
    for (action, rules) in by_action.into_iter().rev() {
        filters.push((
            format!("action {action}"),
            build_filter(rules, Action::Allow, action)?,
        ));
    }
    if filters.is_empty() {
        // Default ALLOW and no other action: still install the architecture guard.
        filters.push((
            "default action SCMP_ACT_ALLOW".to_string(),
            build_filter(RuleMap::new(), Action::Allow, Action::KillProcess)?,
        ));
    }

    let mut programs = Vec::with_capacity(filters.len());
    for (i, (what, filter)) in filters.into_iter().enumerate() {
        let mut program: BpfProgram =
            filter
                .try_into()
                .map_err(|e: BackendError| SeccompError::Build {
                    what: what.clone(),
                    detail: e.to_string(),
                })?;
        if i == 0 {
            program = add_x32_guard(program).map_err(|detail| SeccompError::Build {
                what: what.clone(),
                detail,
            })?;
        }
        if program.len() > BPF_MAXINSNS {
            return Err(SeccompError::Build {
                what,
                detail: format!(
                    "{} BPF instructions, the kernel accepts at most {BPF_MAXINSNS}",
                    program.len()
                ),
            });
        }
        programs.push(
            program
                .into_iter()
                .map(|ins| libc::sock_filter {
                    code: ins.code,
                    jt: ins.jt,
                    jf: ins.jf,
                    k: ins.k,
                })
                .collect(),
        );
    }
    Ok(CompiledSeccomp { programs, flags })
}

/// Logs what happens to the architectures the spec lists (see the module doc).
fn check_architectures(arches: &[Arch]) {
    for arch in arches {
        match arch {
            Arch::ScmpArchNative | Arch::ScmpArchX86_64 => {}
            Arch::ScmpArchX86 | Arch::ScmpArchX32 => tracing::debug!(
                arch = %arch,
                "seccomp: rules are compiled for x86_64 only; syscalls of this ABI are killed"
            ),
            other => {
                tracing::debug!(arch = %other, "seccomp: not this machine's architecture; ignored")
            }
        }
    }
}

/// Translates one OCI argument condition (always a 64-bit comparison, as libseccomp does).
fn condition(
    arg: &LinuxSeccompArg,
    rule: &dyn Fn() -> String,
) -> Result<SeccompCondition, SeccompError> {
    let index = arg.index();
    if index > MAX_ARG_INDEX {
        return Err(SeccompError::ArgIndex {
            rule: rule(),
            index,
        });
    }
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // OCI: (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    // The index was checked above, so it fits in u8 and seccompiler accepts it.
    SeccompCondition::new(index as u8, SeccompCmpArgLen::Qword, op, value).map_err(|e| {
        SeccompError::Build {
            what: rule(),
            detail: e.to_string(),
        }
    })
}

/// Adds `rule` for syscall `nr` to a filter's rule map.
fn push_rule(map: &mut RuleMap, nr: i64, rule: &Rule) -> Result<(), SeccompError> {
    let entry = map.entry(nr).or_default();
    if rule.conditions.is_empty() {
        // Unconditional: after resolution it is the syscall's only rule.
        entry.clear();
    } else {
        let built = SeccompRule::new(rule.conditions.clone()).map_err(|e| SeccompError::Build {
            what: format!("syscall {nr}"),
            detail: e.to_string(),
        })?;
        entry.push(built);
    }
    Ok(())
}

fn build_filter(
    rules: RuleMap,
    mismatch: Action,
    matched: Action,
) -> Result<SeccompFilter, SeccompError> {
    SeccompFilter::new(
        rules,
        mismatch.to_seccompiler(),
        matched.to_seccompiler(),
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build {
        what: format!("action {matched}"),
        detail: e.to_string(),
    })
}

/// Inserts, right after seccompiler's architecture check, a guard that kills the process
/// for x32 syscalls (numbers with bit 30 set; -1 passes, as libseccomp lets it).
fn add_x32_guard(program: BpfProgram) -> Result<BpfProgram, String> {
    // seccompiler's prologue is what an empty filter compiles to, minus its final return.
    let empty: BpfProgram = build_filter(RuleMap::new(), Action::Allow, Action::KillProcess)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: BackendError| e.to_string())?;
    let prologue = &empty[..empty.len() - 1];
    if !program.starts_with(prologue) {
        return Err("seccompiler's architecture check is not where expected".to_string());
    }
    let guard = [
        ins(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        // nr >= X32 bit: check for -1 next; otherwise skip the guard.
        ins(BPF_JMP_JGE_K, 0, 2, X32_SYSCALL_BIT),
        ins(BPF_JMP_JEQ_K, 1, 0, u32::MAX),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    let mut out = Vec::with_capacity(program.len() + guard.len());
    out.extend_from_slice(prologue);
    out.extend_from_slice(&guard);
    out.extend_from_slice(&program[prologue.len()..]);
    Ok(out)
}

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> CompiledSeccomp {
        compile(&parse_json(json).expect("parse")).expect("compile")
    }

    #[test]
    fn default_allow_without_rules_still_guards_the_architecture() {
        let c = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#);
        assert_eq!(c.filter_count(), 1);
        // arch check (3) + x32 guard (4) + ret ALLOW.
        assert_eq!(c.instruction_count(), 8);
    }

    #[test]
    fn one_filter_per_distinct_action_plus_default() {
        let c = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,"syscalls":[
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                {"names":["rmdir"],"action":"SCMP_ACT_ERRNO","errnoRet":22},
                {"names":["chdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                {"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        assert_eq!(c.filter_count(), 3);
    }

    #[test]
    fn default_action_rules_and_shadowed_rules_add_no_filter() {
        // ERRNO(EPERM) equals the default; the KILL rule for getpid is shadowed by the
        // earlier unconditional ALLOW; only the default filter remains.
        let c = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO"},
                {"names":["getpid"],"action":"SCMP_ACT_ALLOW"},
                {"names":["getpid"],"action":"SCMP_ACT_KILL"}]}"#,
        );
        assert_eq!(c.filter_count(), 1);
    }

    #[test]
    fn x32_guard_follows_the_arch_check() {
        let c = profile(r#"{"defaultAction":"SCMP_ACT_KILL"}"#);
        let p = &c.programs[0];
        assert_eq!(p[3].code, BPF_LD_W_ABS);
        assert_eq!((p[4].code, p[4].k), (BPF_JMP_JGE_K, X32_SYSCALL_BIT));
        assert_eq!(p[6].k, libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(p.last().map(|i| i.k), Some(libc::SECCOMP_RET_KILL_THREAD));
    }
}
