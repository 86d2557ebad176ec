//! The SIGSYS report: when a thread makes a syscall outside its filter
//! (`SECCOMP_RET_TRAP`), the handler writes one line naming the thread and the syscall,
//! with async-signal-safe calls only, and ends the process with [`EXIT_SECCOMP`]. The
//! thread's name comes from a const thread-local each thread sets in
//! [`super::enter`].

use std::cell::Cell;

use super::names::syscall_name;
use super::{SeccompError, ThreadKind, EXIT_SECCOMP};

thread_local! {
    /// This thread's kind and index, for the SIGSYS report (const: no lazy init, so
    /// reading it in the handler is a plain TLS load).
    static THREAD: Cell<(u8, u8)> = const { Cell::new((0, 0)) };
}

/// Records this thread's kind for the report.
pub(super) fn set_thread(kind: ThreadKind) {
    let (code, index) = match kind {
        ThreadKind::Main => (0, 0),
        ThreadKind::Vcpu(i) => (1, i),
        ThreadKind::Virtio => (2, 0),
        ThreadKind::Signals => (3, 0),
        ThreadKind::Pages => (4, 0),
    };
    THREAD.with(|t| t.set((code, index)));
}

/// Appends `s` to `buf` at `*len` (truncating at the end of `buf`).
fn put(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if *len < buf.len() {
            buf[*len] = b;
            *len += 1;
        }
    }
}

fn put_num(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, len, &digits[i..]);
}

/// The report line for `thread` (kind code, index) making syscall `nr`.
fn report(buf: &mut [u8], thread: (u8, u8), nr: i64) -> usize {
    let mut len = 0;
    put(buf, &mut len, b"nestor-vmm: seccomp: thread ");
    match thread.0 {
        1 => {
            put(buf, &mut len, b"vcpu");
            put_num(buf, &mut len, u64::from(thread.1));
        }
        2 => put(buf, &mut len, b"virtio-events"),
        3 => put(buf, &mut len, b"signals"),
        4 => put(buf, &mut len, b"pages"),
        _ => put(buf, &mut len, b"main"),
    }
    put(buf, &mut len, b" made forbidden syscall ");
    put_num(buf, &mut len, nr as u64);
    put(buf, &mut len, b" (");
    put(
        buf,
        &mut len,
        syscall_name(nr).unwrap_or("unknown").as_bytes(),
    );
    put(buf, &mut len, b")\n");
    len
}

/// The kernel's siginfo for SIGSYS (`_sigsys` member of the union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

extern "C" fn sigsys_handler(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS it has the _sigsys layout.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let thread = THREAD.with(|t| t.get());
    let mut buf = [0u8; 160];
    let len = report(&mut buf, thread, i64::from(nr));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; buf outlives the call.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

pub(super) fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction with a valid handler and flags is a valid argument.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Install {
            thread: "main",
            msg: format!("sigaction(SIGSYS): {}", std::io::Error::last_os_error()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_line_names_thread_and_syscall() {
        let mut buf = [0u8; 160];
        let n = report(&mut buf, (1, 3), libc::SYS_openat);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            format!(
                "nestor-vmm: seccomp: thread vcpu3 made forbidden syscall {} (openat)\n",
                libc::SYS_openat
            )
        );
        let n = report(&mut buf, (2, 0), 99_999);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .ends_with("thread virtio-events made forbidden syscall 99999 (unknown)\n"));
    }
}
