//! Finding the program a container process runs and proving, before the process says
//! it is ready, that the kernel will execute it: found (`$PATH` as execvp searches it),
//! a regular file, executable for the process's final credentials, not on a noexec
//! mount, and, for an ELF with an interpreter (a dynamic binary) or a `#!` script,
//! an interpreter that exists and is executable in turn. So `create` and `run` fail
//! with the reason (runc's "not found" / "permission denied", plus the bad interpreter
//! runc only reports after `start`) instead of leaving a container whose exec fails in
//! the dmz with nothing said.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::error::{Error, Result};

pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The kernel's limit on nested `#!` interpreters.
const MAX_SCRIPT_DEPTH: u32 = 4;
/// The kernel reads this much of a file to find a `#!` line (BINPRM_BUF_SIZE).
const HEAD: usize = 256;

/// An errno as a lower-case phrase ("no such file or directory").
fn text(e: Errno) -> String {
    let d = e.desc();
    let mut c = d.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => d.to_string(),
    }
}

fn fail(arg0: &str, why: String) -> Error {
    Error::Invalid(format!("exec {arg0}: {why}"))
}

/// Find the program to exec, as execvp would, with the container's PATH, and check
/// that it can be executed ([`check`]). Runs inside the container, with the process's
/// final user and capabilities.
pub(crate) fn resolve(arg0: &str, env: &[String]) -> Result<PathBuf> {
    if arg0.contains('/') {
        let p = PathBuf::from(arg0);
        check(arg0, &p)?;
        return Ok(p);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let mut denied = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(arg0);
        match std::fs::metadata(&cand) {
            Ok(m) if m.is_file() => {}
            _ => continue,
        }
        if access_x(&cand).is_err() {
            // execvp goes on searching after EACCES, and reports it if nothing else fits.
            denied.get_or_insert(cand);
            continue;
        }
        check(arg0, &cand)?;
        return Ok(cand);
    }
    if let Some(d) = denied {
        return Err(fail(arg0, format!("{}: permission denied", d.display())));
    }
    Err(Error::Invalid(format!(
        "exec {arg0}: executable file not found in $PATH ({path})"
    )))
}

/// execve's checks on `p` (named `arg0` in errors), the interpreters included.
pub(crate) fn check(arg0: &str, p: &Path) -> Result<()> {
    check_file(arg0, p, "", 0)
}

fn access_x(p: &Path) -> nix::Result<()> {
    nix::unistd::faccessat(
        None,
        p,
        nix::unistd::AccessFlags::X_OK,
        nix::fcntl::AtFlags::AT_EACCESS,
    )
}

/// Open without following magic links (`/proc/self/exe`): at exec time such a link
/// points at the dmz, not at what it points to now, so it is not inspected.
fn open_plain(p: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    crate::sys::open_no_magiclinks(p, flags)
}

/// `what` is "" for the program itself, or "interpreter " / "bad ELF interpreter "
/// prefixes for the files execve opens on its behalf.
fn check_file(arg0: &str, p: &Path, what: &str, depth: u32) -> Result<()> {
    let name = |why: String| {
        if what.is_empty() {
            fail(arg0, why)
        } else {
            fail(arg0, format!("{what}{}: {why}", p.display()))
        }
    };
    let fd = match open_plain(p, OFlag::O_PATH) {
        Ok(fd) => fd,
        Err(Errno::ELOOP) if std::fs::metadata(p).is_ok() => return Ok(()),
        Err(e) => return Err(name(text(e))),
    };
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| name(text(e)))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(name(
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                "is a directory (permission denied)"
            } else {
                "is not a regular file (permission denied)"
            }
            .into(),
        ));
    }
    let mut vfs = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs fills the struct on success; read only then.
    if unsafe { libc::fstatvfs(fd.as_raw_fd(), vfs.as_mut_ptr()) } == 0 {
        // SAFETY: initialised by the successful call above.
        let vfs = unsafe { vfs.assume_init() };
        if vfs.f_flag & libc::ST_NOEXEC != 0 {
            return Err(name("permission denied (its mount is noexec)".into()));
        }
    }
    access_x(p).map_err(|e| name(text(e)))?;
    if what == "bad ELF interpreter " {
        // The dynamic loader's own interpreter is not followed by the kernel.
        return Ok(());
    }
    // Unreadable (mode 0711 for a non-root user): execve may still run it; the
    // interpreter cannot be checked, so it is not.
    let Ok(f) = open_plain(p, OFlag::O_RDONLY) else {
        return Ok(());
    };
    let f = std::fs::File::from(f);
    let mut head = [0u8; HEAD];
    let n = read_at(&f, &mut head, 0);
    let head = &head[..n];
    if head.starts_with(b"#!") {
        if depth >= MAX_SCRIPT_DEPTH {
            return Err(name("too many levels of #! interpreters".into()));
        }
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
        let interp = line
            .split(|&b| b == b' ' || b == b'\t')
            .find(|s| !s.is_empty());
        return match interp {
            Some(i) => check_file(
                arg0,
                Path::new(OsStr::from_bytes(i)),
                "interpreter ",
                depth + 1,
            ),
            None => Err(name(
                "#! line names no interpreter (exec format error)".into(),
            )),
        };
    }
    if head.starts_with(b"\x7fELF") {
        if let Some(interp) = elf_interp(&f, head).map_err(name)? {
            return check_file(arg0, &interp, "bad ELF interpreter ", depth + 1);
        }
    }
    Ok(())
}

fn read_at(f: &std::fs::File, buf: &mut [u8], off: u64) -> usize {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// The PT_INTERP path of an ELF file (None when it has none, or when it is not an
/// ELF the kernel would load this way). Every offset is bounds-checked: the file is
/// the container's and untrusted.
fn elf_interp(f: &std::fs::File, head: &[u8]) -> std::result::Result<Option<PathBuf>, String> {
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
    };
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
    };
    // Little-endian only (the hosts nestor runs on); anything else is left to the kernel.
    if head.get(5) != Some(&1) {
        return Ok(None);
    }
    let wide = match head.get(4) {
        Some(2) => true,
        Some(1) => false,
        _ => return Ok(None),
    };
    let (phoff, phentsize, phnum) = if wide {
        (u64_at(head, 32), u16_at(head, 54), u16_at(head, 56))
    } else {
        (
            u32_at(head, 28).map(u64::from),
            u16_at(head, 42),
            u16_at(head, 44),
        )
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        return Ok(None);
    };
    let min = if wide { 56 } else { 32 };
    if (phentsize as usize) < min || phnum == 0 || phnum > 1024 {
        return Ok(None);
    }
    let mut ph = vec![0u8; phentsize as usize];
    for i in 0..phnum as u64 {
        if read_at(f, &mut ph, phoff + i * phentsize as u64) < min {
            return Ok(None);
        }
        if u32_at(&ph, 0) != Some(3) {
            continue; // not PT_INTERP
        }
        let (off, size) = if wide {
            (u64_at(&ph, 8), u64_at(&ph, 32))
        } else {
            (
                u32_at(&ph, 4).map(u64::from),
                u32_at(&ph, 16).map(u64::from),
            )
        };
        let (Some(off), Some(size)) = (off, size) else {
            return Ok(None);
        };
        if !(2..=libc::PATH_MAX as u64).contains(&size) {
            return Err("its ELF interpreter path is malformed (exec format error)".into());
        }
        let mut buf = vec![0u8; size as usize];
        if read_at(f, &mut buf, off) != buf.len() || buf.last() != Some(&0) {
            return Err("its ELF interpreter path is malformed (exec format error)".into());
        }
        buf.pop();
        let s = OsStr::from_bytes(&buf);
        return Ok(Some(PathBuf::from(s)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_interpreters_and_refuses_what_execve_would() {
        let d = tempfile::tempdir().unwrap();
        let w = |name: &str, body: &[u8], mode: u32| {
            let p = d.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
            p
        };
        let sh = std::fs::read("/bin/sh").unwrap();
        let ok = w("ok.sh", b"#!/bin/sh\necho hi\n", 0o755);
        check("ok.sh", &ok).unwrap();
        let bad = w("bad.sh", b"#!/no/such/interp -x\n", 0o755);
        let e = check("bad.sh", &bad).unwrap_err().to_string();
        assert!(
            e.contains("interpreter /no/such/interp: no such file or directory"),
            "{e}"
        );
        let e = check("noexec", &w("noexec", b"#!/bin/sh\n", 0o644))
            .unwrap_err()
            .to_string();
        // Root passes access(X_OK) only when some execute bit is set.
        assert!(e.contains("permission denied"), "{e}");
        let e = check("dir", d.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        // A dynamic ELF whose interpreter is missing: rewrite the interpreter path.
        let mut elf = sh.clone();
        let at = elf
            .windows(4)
            .position(|x| x == b"/lib")
            .expect("/bin/sh is dynamic here");
        elf[at + 1] = b'X';
        let dynbad = w("dynbad", &elf, 0o755);
        let e = check("dynbad", &dynbad).unwrap_err().to_string();
        assert!(e.contains("bad ELF interpreter /Xib"), "{e}");
        check("sh", Path::new("/bin/sh")).unwrap();
        // Garbage headers are left to the kernel, never a panic.
        let mut junk = b"\x7fELF\x02\x01".to_vec();
        junk.resize(64, 0xff);
        check("junk", &w("junk", &junk, 0o755)).unwrap();
        let e = resolve("no-such-prog", &["PATH=/nonexistent:/bin".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found in $PATH"), "{e}");
        assert_eq!(
            resolve("sh", &["PATH=/bin".into()]).unwrap(),
            Path::new("/bin/sh")
        );
    }
}
