//! Safe extraction of one layer tarball into an empty directory, producing a directory
//! that overlayfs can use directly as a read-only lower layer.
//!
//! Safety rules (every refusal is an [`ImageError::UnsafeEntry`] naming the entry):
//! - A path with a `..` component is refused ("escapes the layer root"). A leading `/`
//!   is stripped, as docker does: `/etc/passwd` is the layer's `etc/passwd`.
//! - Nothing is ever followed: every parent directory is opened component by component
//!   with `O_NOFOLLOW | O_DIRECTORY` relative to the layer root, so an entry whose path
//!   goes through a symlink (`a -> /etc`, then `a/passwd`) is refused, and a final
//!   component that exists is unlinked and re-created, never opened through.
//! - Hard links must name a target already extracted in this layer; the target path obeys
//!   the same rules (no `..`, no symlinked parents) and its last component is linked
//!   itself (`linkat` without `AT_SYMLINK_FOLLOW`).
//! - Character and block devices are refused, except a character device 0:0, which is the
//!   overlayfs whiteout form. FIFOs are allowed (they grant nothing).
//! - Modes (setuid/setgid/sticky kept: the container runtime decides), numeric uid/gid,
//!   mtimes, and the xattrs `user.*` and `security.capability` are preserved; other xattrs
//!   (notably `trusted.*`, which could forge overlayfs metadata) are dropped.
//!
//! Budgets (see [`crate::ImportLimits`]): every entry the tar reader yields counts
//! against the entry budget, and regular file content counts against the byte budget as
//! it is written, chunk by chunk, so a refusal comes before the first byte past it (a
//! header size over what is left is refused before anything is written). GNU sparse
//! entries are stored sparse: blocks of zeros in them (their holes, which the tar reader
//! yields as zeros) are skipped with a seek, and the file gets its apparent length with
//! `set_len`, so a small tarball never allocates a large file; their apparent size still
//! counts against the byte budget, which also bounds the time spent reading holes.
//!
//! Whiteouts are converted to overlayfs form, as containers/storage does: `.wh.NAME`
//! becomes a character device 0:0 named NAME, `.wh..wh..opq` sets
//! `trusted.overlay.opaque=y` on its directory; other `.wh..wh.*` (aufs metadata) are
//! skipped.

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

use crate::limits::{Budget, Meter};
use crate::ImageError;

/// The budgets one layer's extraction is held to, and the name refusals give it.
#[derive(Debug, Clone)]
pub(crate) struct LayerBudgets {
    /// `layer sha256:<diff_id hex>`.
    pub subject: String,
    /// Bytes of regular file content (apparent sizes).
    pub bytes: Budget,
    /// Tar entries yielded by the reader.
    pub entries: Budget,
}

/// Most bytes the tar reader may read for the headers of one entry (its own, pax records,
/// GNU long name and link, sparse map), which it holds in memory.
const MAX_HEADERS: u64 = 4 << 20;

/// Granularity of hole detection in sparse entries (a file system block).
const HOLE_BLOCK: usize = 4096;
static ZEROS: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];

/// What one extraction produced.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ExtractStats {
    /// Entries written (files, dirs, links, whiteouts).
    pub entries: u64,
    /// Bytes of regular file content written (apparent sizes: holes included).
    pub bytes: u64,
    /// Entries the tar reader yielded (what the entry budget counts).
    pub seen: u64,
}

#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// Extracts the tar stream `reader` into the existing empty directory `root`.
/// `layer` names the layer in errors. Stops at the end-of-archive marker; the caller
/// drains the rest of the stream if it needs its digest.
pub(crate) fn extract_layer<R: Read>(
    reader: R,
    root: &Path,
    layer: &str,
    budgets: &LayerBudgets,
) -> Result<ExtractStats, ImageError> {
    let root_c = CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| ImageError::invalid("layer directory", "path contains NUL"))?;
    // SAFETY: plain open(2) of a path we own; the result is checked.
    let fd = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    let root_fd =
        owned(fd).map_err(|e| ImageError::io(format!("cannot open {}", root.display()), e))?;
    let root_mode = nix::sys::stat::fstat(root_fd.as_raw_fd())
        .ok()
        .map(|st| st.st_mode);
    let mut x = Extractor {
        root: Rc::new(root_fd),
        layer,
        dirs: Vec::new(),
        root_meta: None,
        stats: ExtractStats::default(),
        budgets,
        last_dir: RefCell::new(None),
        fresh: FreshFile::probe(root_mode),
    };
    // The tar reader keeps pax records, GNU long names and sparse maps in memory: while
    // it reads the headers of the next entry, it may read at most MAX_HEADERS.
    let gate = Meter::new(u64::MAX);
    let mut ar = tar::Archive::new(gate.reader(reader));
    let bad = |e: io::Error| ImageError::BadLayer {
        layer: layer.to_string(),
        reason: if gate.phase_tripped() {
            format!("the headers of one entry (pax records, long names, sparse maps) take more than {MAX_HEADERS} bytes")
        } else {
            format!("not a readable tar stream: {e}")
        },
    };
    let mut entries = ar.entries().map_err(bad)?;
    loop {
        gate.limit_phase(MAX_HEADERS);
        let next = entries.next();
        gate.end_phase();
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(bad)?;
        if x.stats.seen >= budgets.entries.limit {
            return Err(budgets
                .entries
                .exceeded(&budgets.subject, "its number of tar entries"));
        }
        x.stats.seen += 1;
        x.entry(&mut entry)?;
        // Whatever the entry holds that was not used is read here, not while the next
        // headers are read.
        io::copy(&mut entry, &mut io::sink()).map_err(bad)?;
    }
    x.finish()?;
    Ok(x.stats)
}

/// A directory descriptor the walks share.
type SharedDir = Rc<OwnedFd>;

struct Extractor<'a> {
    root: Rc<OwnedFd>,
    layer: &'a str,
    dirs: Vec<(Vec<Vec<u8>>, Meta)>,
    root_meta: Option<Meta>,
    stats: ExtractStats,
    budgets: &'a LayerBudgets,
    /// The directory the last walk reached, and its path: tar entries come grouped by
    /// directory, so the next walk starts there when its path lies below, instead of
    /// opening every component from the root again. Only this extraction changes the
    /// tree, and the only thing it removes is an entry [`Extractor::clear`] replaces,
    /// which drops this first; so the descriptor is what a fresh walk would reach.
    /// Shared, not duplicated: a walk that starts there costs no `dup` and `close`.
    last_dir: RefCell<Option<(Vec<Vec<u8>>, SharedDir)>>,
    /// What a regular file this extraction creates is born with, where that is known.
    fresh: FreshFile,
}

/// The owner and mode a regular file gets when this extraction creates it, so that the
/// `fchown` and `fchmod` that would set what it already has are skipped: two of the
/// five syscalls per file of a pull's extraction.
#[derive(Debug, Clone, Copy)]
struct FreshFile {
    /// The creating process's effective uid and gid, when no directory of the layer
    /// can hand its group down: the layer root is not setgid, and every directory
    /// below it is made here (0755 for a missing parent, 0700 for a directory entry)
    /// and gets its own mode only when the layer ends.
    owner: Option<(u32, u32)>,
    /// The process's umask (`/proc/self/status`), when known.
    umask: Option<u32>,
}

impl FreshFile {
    /// `root_mode`: the layer root's `st_mode`, when it could be read.
    fn probe(root_mode: Option<libc::mode_t>) -> Self {
        let owner = root_mode
            .filter(|m| m & libc::S_ISGID == 0)
            // SAFETY: geteuid(2) and getegid(2) cannot fail.
            .map(|_| unsafe { (libc::geteuid(), libc::getegid()) });
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let v = s.lines().find_map(|l| l.strip_prefix("Umask:"))?;
                u32::from_str_radix(v.trim(), 8).ok()
            });
        FreshFile { owner, umask }
    }

    /// The mode to create a file with: the entry's permission bits without group or
    /// other write (nobody else may hold a writable descriptor of a file being filled).
    fn create_mode(meta: &Meta) -> u32 {
        meta.mode & 0o755
    }

    /// Whether the new file already has the entry's owner, and its mode.
    fn has(&self, meta: &Meta) -> (bool, bool) {
        let owner = self.owner == Some((meta.uid, meta.gid));
        let mode = self
            .umask
            .is_some_and(|u| meta.mode & 0o7777 == Self::create_mode(meta) & !u);
        (owner, mode)
    }
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: fd was just returned by a successful syscall and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: openat(2) with a valid dirfd and NUL-terminated name; result checked.
    owned(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

/// File type bits (`S_IFMT`) of `name` in `dir`, not following symlinks; `None` if absent.
fn file_type_at(dir: RawFd, name: &CStr) -> io::Result<Option<u32>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstatat(2) writes into st on success; we read it only then.
    let r = unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if errno(&e) == libc::ENOENT {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: fstatat succeeded, so st is initialised.
    Ok(Some(unsafe { st.assume_init() }.st_mode & libc::S_IFMT))
}

fn set_xattr(fd: RawFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: fsetxattr(2) reads name and value for the given lengths.
    cvt(unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

fn times(mtime: i64) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    [ts, ts]
}

/// Splits a tar path into components: leading `/` and `.` dropped, `..` refused.
fn split_path(raw: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("escapes the layer root ('..' component)"),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn show(comps: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&comps.join(&b'/')).into_owned()
}

impl Extractor<'_> {
    fn unsafe_entry(&self, entry: &str, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    fn io_err(&self, entry: &str, what: &str, e: io::Error) -> ImageError {
        ImageError::io(format!("layer {}: entry '{entry}': {what}", self.layer), e)
    }

    /// Opens the directory `comps` below the root without following any symlink,
    /// creating missing directories (mode 0755) when `create` is set. `role` starts the
    /// refusal reason: empty for the entry's own path, else e.g. "is a hard link whose
    /// target 'x' " (with its trailing space).
    fn walk(
        &self,
        comps: &[Vec<u8>],
        create: bool,
        entry: &str,
        role: &str,
    ) -> Result<Rc<OwnedFd>, ImageError> {
        let (start, mut cur) = match &*self.last_dir.borrow() {
            Some((p, fd)) if comps.starts_with(p) => (p.len(), Rc::clone(fd)),
            _ => (0, Rc::clone(&self.root)),
        };
        if start == comps.len() && start > 0 {
            return Ok(cur);
        }
        for (i, c) in comps.iter().enumerate().skip(start) {
            let name = cstr(c).map_err(|e| self.io_err(entry, "bad name", e))?;
            match open_dir_at(cur.as_raw_fd(), &name) {
                Ok(fd) => cur = Rc::new(fd),
                Err(e) if errno(&e) == libc::ENOENT && create => {
                    // SAFETY: mkdirat(2) with a valid dirfd and name.
                    let r = cvt(unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) });
                    if let Err(e) = r {
                        if errno(&e) != libc::EEXIST {
                            return Err(self.io_err(entry, "cannot create parent directory", e));
                        }
                    }
                    cur = Rc::new(
                        open_dir_at(cur.as_raw_fd(), &name)
                            .map_err(|e| self.io_err(entry, "cannot open parent directory", e))?,
                    );
                }
                Err(e) if errno(&e) == libc::ENOENT => {
                    return Err(self.unsafe_entry(
                        entry,
                        format!(
                            "{role}needs '{}', which does not exist in this layer",
                            show(&comps[..=i])
                        ),
                    ))
                }
                Err(e) if errno(&e) == libc::ELOOP || errno(&e) == libc::ENOTDIR => {
                    let prefix = show(&comps[..=i]);
                    let is_link = matches!(file_type_at(cur.as_raw_fd(), &name), Ok(Some(t)) if t == libc::S_IFLNK);
                    let reason = if is_link {
                        format!("{role}goes through the symlink '{prefix}' (refused: symlinks are never followed during extraction)")
                    } else {
                        format!("{role}goes through '{prefix}', which is not a directory")
                    };
                    return Err(self.unsafe_entry(entry, reason));
                }
                Err(e) => return Err(self.io_err(entry, "cannot open parent directory", e)),
            }
        }
        *self.last_dir.borrow_mut() = Some((comps.to_vec(), Rc::clone(&cur)));
        Ok(cur)
    }

    /// Clears `name` in `dir` so a non-directory can be created there. An empty directory
    /// is removed; a non-empty one is an error.
    fn clear(&self, dir: RawFd, name: &CStr, entry: &str) -> Result<(), ImageError> {
        match file_type_at(dir, name).map_err(|e| self.io_err(entry, "stat", e))? {
            None => Ok(()),
            Some(t) => {
                // The removed entry may be a directory the last walk reached.
                self.last_dir.borrow_mut().take();
                let flags = if t == libc::S_IFDIR {
                    libc::AT_REMOVEDIR
                } else {
                    0
                };
                // SAFETY: unlinkat(2) with a valid dirfd and name.
                cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map_err(|e| {
                    if errno(&e) == libc::ENOTEMPTY || errno(&e) == libc::EEXIST {
                        self.unsafe_entry(
                            entry,
                            "would replace a non-empty directory of the same layer",
                        )
                    } else {
                        self.io_err(entry, "cannot replace existing file", e)
                    }
                })
            }
        }
    }

    /// Copies an entry's content into `f`, counting every chunk against the byte budget
    /// before it is written. `sparse`: all-zero blocks become holes and the length is set
    /// at the end.
    fn write_content(
        &mut self,
        r: &mut impl Read,
        f: &mut File,
        size: u64,
        sparse: bool,
        disp: &str,
    ) -> Result<(), ImageError> {
        let budget = self.budgets.bytes;
        let over = |x: &Self| {
            budget.exceeded(
                &x.budgets.subject,
                format!("its extracted file content (entry '{disp}')"),
            )
        };
        if size > budget.limit - self.stats.bytes {
            return Err(over(self));
        }
        let copy_err = |x: &Self, err: io::Error| ImageError::BadLayer {
            layer: x.layer.to_string(),
            reason: format!("entry '{disp}': cannot copy its content: {err}"),
        };
        let mut buf = vec![0u8; 16 * HOLE_BLOCK];
        let mut off = 0u64;
        loop {
            let n = fill(r, &mut buf).map_err(|err| copy_err(self, err))?;
            if n == 0 {
                break;
            }
            if n as u64 > budget.limit - self.stats.bytes {
                return Err(over(self));
            }
            if sparse {
                let mut start = 0;
                while start < n {
                    let end = (start + HOLE_BLOCK).min(n);
                    if buf[start..end] == ZEROS[..end - start] {
                        start = end;
                        continue;
                    }
                    // A run of blocks with data: one write.
                    let mut run_end = end;
                    while run_end < n {
                        let e = (run_end + HOLE_BLOCK).min(n);
                        if buf[run_end..e] == ZEROS[..e - run_end] {
                            break;
                        }
                        run_end = e;
                    }
                    f.write_all_at(&buf[start..run_end], off + start as u64)
                        .map_err(|err| copy_err(self, err))?;
                    start = run_end;
                }
            } else {
                f.write_all(&buf[..n]).map_err(|err| copy_err(self, err))?;
            }
            off += n as u64;
            self.stats.bytes += n as u64;
        }
        if sparse {
            f.set_len(off).map_err(|err| copy_err(self, err))?;
        }
        Ok(())
    }

    fn apply_fd(&self, fd: RawFd, meta: &Meta, entry: &str) -> Result<(), ImageError> {
        self.apply_fd_as(fd, meta, (false, false), entry)
    }

    /// [`Extractor::apply_fd`], skipping the owner and the mode where `(owner, mode)`
    /// says the node already has them.
    fn apply_fd_as(
        &self,
        fd: RawFd,
        meta: &Meta,
        (has_owner, has_mode): (bool, bool),
        entry: &str,
    ) -> Result<(), ImageError> {
        // Order matters: chown clears setuid bits and file capabilities, so chmod and the
        // xattrs come after it, and the mtime last.
        if !has_owner {
            // SAFETY: plain syscalls on a valid fd.
            cvt(unsafe { libc::fchown(fd, meta.uid, meta.gid) })
                .map_err(|e| self.io_err(entry, "chown", e))?;
        }
        if !has_mode {
            // SAFETY: fchmod(2) on the caller's fd, open for the whole call.
            cvt(unsafe { libc::fchmod(fd, meta.mode as libc::mode_t) })
                .map_err(|e| self.io_err(entry, "chmod", e))?;
        }
        for (k, v) in &meta.xattrs {
            set_xattr(fd, k, v).map_err(|e| self.io_err(entry, "set xattr", e))?;
        }
        let ts = times(meta.mtime);
        // SAFETY: futimens(2) reads two timespecs.
        cvt(unsafe { libc::futimens(fd, ts.as_ptr()) })
            .map_err(|e| self.io_err(entry, "set mtime", e))
    }

    /// Owner, mode and mtime for a node that cannot be opened (symlink, fifo, device),
    /// set by name in its parent without following it.
    fn apply_at(
        &self,
        dir: RawFd,
        name: &CStr,
        meta: &Meta,
        chmod: bool,
        entry: &str,
    ) -> Result<(), ImageError> {
        // SAFETY: *at syscalls with a valid dirfd and name; AT_SYMLINK_NOFOLLOW everywhere
        // it exists.
        cvt(unsafe {
            libc::fchownat(
                dir,
                name.as_ptr(),
                meta.uid,
                meta.gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|e| self.io_err(entry, "chown", e))?;
        if chmod {
            // SAFETY: fchmodat(2) with a valid dirfd and a NUL-terminated name.
            cvt(unsafe { libc::fchmodat(dir, name.as_ptr(), meta.mode as libc::mode_t, 0) })
                .map_err(|e| self.io_err(entry, "chmod", e))?;
        }
        let ts = times(meta.mtime);
        // SAFETY: utimensat(2) with a valid dirfd, a NUL-terminated name and two timespecs
        // that outlive the call; AT_SYMLINK_NOFOLLOW, so a link itself is changed.
        cvt(unsafe { libc::utimensat(dir, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
            .map_err(|e| self.io_err(entry, "set mtime", e))
    }

    /// Mode, owner, mtime and kept xattrs of an entry, from its header and pax records.
    fn read_meta<R: Read>(
        &self,
        e: &mut tar::Entry<'_, R>,
        disp: &str,
    ) -> Result<Meta, ImageError> {
        let bad = |err: io::Error| ImageError::BadLayer {
            layer: self.layer.to_string(),
            reason: format!("entry '{disp}': {err}"),
        };

        let mut xattrs = Vec::new();
        let (mut pax_uid, mut pax_gid) = (None, None);
        if let Some(exts) = e.pax_extensions().map_err(bad)? {
            for ext in exts {
                let ext = ext.map_err(bad)?;
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    if name.starts_with("user.") || name == "security.capability" {
                        if let Ok(n) = CString::new(name) {
                            xattrs.push((n, ext.value_bytes().to_vec()));
                        }
                    } else {
                        tracing::debug!(layer = self.layer, entry = %disp, xattr = name, "dropping xattr");
                    }
                } else if key == "uid" {
                    pax_uid = std::str::from_utf8(ext.value_bytes())
                        .ok()
                        .and_then(|v| v.parse().ok());
                } else if key == "gid" {
                    pax_gid = std::str::from_utf8(ext.value_bytes())
                        .ok()
                        .and_then(|v| v.parse().ok());
                }
            }
        }
        let hdr = e.header();
        let id = |v: u64| u32::try_from(v).ok();
        // A field left all-NUL (some writers do this) reads as 0, as GNU tar reads it.
        let old = hdr.as_old();
        let num = |field: &[u8], parsed: io::Result<u64>| {
            if field.iter().all(|&b| b == 0) {
                Ok(0)
            } else {
                parsed
            }
        };
        let unreadable = |what: &str| {
            bad(io::Error::other(format!(
                "unreadable {what} in its tar header"
            )))
        };
        Ok(Meta {
            mode: num(&old.mode, hdr.mode().map(u64::from)).map_err(|_| unreadable("mode"))? as u32
                & 0o7777,
            uid: match pax_uid {
                Some(u) => u,
                None => num(&old.uid, hdr.uid())
                    .ok()
                    .and_then(id)
                    .ok_or_else(|| unreadable("uid"))?,
            },
            gid: match pax_gid {
                Some(g) => g,
                None => num(&old.gid, hdr.gid())
                    .ok()
                    .and_then(id)
                    .ok_or_else(|| unreadable("gid"))?,
            },
            mtime: num(&old.mtime, hdr.mtime())
                .map_err(|_| unreadable("mtime"))?
                .min(i64::MAX as u64) as i64,
            xattrs,
        })
    }

    /// `.wh.NAME` becomes a char 0:0 device NAME; `.wh..wh..opq` marks its directory
    /// opaque; other `.wh..wh.*` (aufs metadata) are skipped.
    fn whiteout(
        &mut self,
        parents: &[Vec<u8>],
        target: &[u8],
        disp: &str,
    ) -> Result<(), ImageError> {
        let parent = self.walk(parents, true, disp, "")?;
        if target == b".wh..opq" {
            set_xattr(parent.as_raw_fd(), c"trusted.overlay.opaque", b"y")
                .map_err(|e| self.io_err(disp, "cannot mark directory opaque", e))?;
        } else if target.starts_with(b".wh.") {
            // aufs metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to do for overlayfs.
        } else if target.is_empty() || target == b"." || target == b".." {
            return Err(self.unsafe_entry(disp, "is a whiteout with no valid name"));
        } else {
            let t = cstr(target).map_err(|e| self.io_err(disp, "bad name", e))?;
            self.clear(parent.as_raw_fd(), &t, disp)?;
            // SAFETY: mknodat(2) with a valid dirfd and name.
            cvt(unsafe {
                libc::mknodat(
                    parent.as_raw_fd(),
                    t.as_ptr(),
                    libc::S_IFCHR,
                    libc::makedev(0, 0),
                )
            })
            .map_err(|e| self.io_err(disp, "cannot create whiteout", e))?;
        }
        self.stats.entries += 1;
        Ok(())
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = e.path_bytes().into_owned();
        let disp = String::from_utf8_lossy(&raw).into_owned();
        let meta = self.read_meta(e, &disp)?;
        let hdr = e.header();
        let kind = hdr.entry_type();
        use tar::EntryType as T;
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }

        let comps = split_path(&raw).map_err(|r| self.unsafe_entry(&disp, r))?;
        let is_dir = kind == T::Directory || (kind == T::Regular && raw.ends_with(b"/"));
        let Some((name, parents)) = comps.split_last() else {
            if is_dir {
                self.root_meta = Some(meta);
                return Ok(());
            }
            return Err(self.unsafe_entry(&disp, "has an empty path"));
        };
        let cname = cstr(name).map_err(|e| self.io_err(&disp, "bad name", e))?;

        if let Some(target) = name.strip_prefix(b".wh.") {
            return self.whiteout(parents, target, &disp);
        }

        let parent = self.walk(parents, true, &disp, "")?;
        let pfd = parent.as_raw_fd();
        match kind {
            _ if is_dir => {
                match file_type_at(pfd, &cname).map_err(|e| self.io_err(&disp, "stat", e))? {
                    Some(t) if t == libc::S_IFDIR => {}
                    existing => {
                        if existing.is_some() {
                            self.clear(pfd, &cname, &disp)?;
                        }
                        // SAFETY: mkdirat(2) with a valid dirfd and name.
                        cvt(unsafe { libc::mkdirat(pfd, cname.as_ptr(), 0o700) })
                            .map_err(|e| self.io_err(&disp, "cannot create directory", e))?;
                    }
                }
                self.dirs.push((comps.clone(), meta));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let create = || {
                    // SAFETY: openat(2) creating a new file (O_EXCL, O_NOFOLLOW); result
                    // checked.
                    owned(unsafe {
                        libc::openat(
                            pfd,
                            cname.as_ptr(),
                            libc::O_WRONLY
                                | libc::O_CREAT
                                | libc::O_EXCL
                                | libc::O_NOFOLLOW
                                | libc::O_CLOEXEC,
                            FreshFile::create_mode(&meta) as libc::c_uint,
                        )
                    })
                };
                // Most names are new: create first, clear what is there only when it
                // exists (O_EXCL never opens or follows an existing entry).
                let fd = match create() {
                    Err(err) if errno(&err) == libc::EEXIST => {
                        self.clear(pfd, &cname, &disp)?;
                        create()
                    }
                    other => other,
                }
                .map_err(|err| self.io_err(&disp, "cannot create file", err))?;
                let mut f = File::from(fd);
                let size = e.size();
                self.write_content(e, &mut f, size, kind == T::GNUSparse, &disp)?;
                self.apply_fd_as(f.as_raw_fd(), &meta, self.fresh.has(&meta), &disp)?;
            }
            T::Symlink => {
                let target = e
                    .link_name_bytes()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.unsafe_entry(&disp, "is a symlink with an empty target"))?;
                let target =
                    cstr(&target).map_err(|err| self.io_err(&disp, "bad link target", err))?;
                self.clear(pfd, &cname, &disp)?;
                // SAFETY: symlinkat(2); the target is stored, never resolved here.
                cvt(unsafe { libc::symlinkat(target.as_ptr(), pfd, cname.as_ptr()) })
                    .map_err(|err| self.io_err(&disp, "cannot create symlink", err))?;
                self.apply_at(pfd, &cname, &meta, false, &disp)?;
            }
            T::Link => {
                let raw_target = e
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| self.unsafe_entry(&disp, "is a hard link with no target"))?;
                let tshow = String::from_utf8_lossy(&raw_target).into_owned();
                let tcomps = split_path(&raw_target).map_err(|_| {
                    self.unsafe_entry(
                        &disp,
                        format!("is a hard link whose target '{tshow}' escapes the layer root"),
                    )
                })?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(self.unsafe_entry(&disp, "is a hard link to the layer root"));
                };
                let role = format!("is a hard link whose target '{tshow}' ");
                let tparent = self.walk(tparents, false, &disp, &role)?;
                let tc = cstr(tname).map_err(|err| self.io_err(&disp, "bad link target", err))?;
                if tparents == parents && tname == name {
                    return Err(self.unsafe_entry(&disp, "is a hard link to itself"));
                }
                self.clear(pfd, &cname, &disp)?;
                // SAFETY: linkat(2) without AT_SYMLINK_FOLLOW: links the target entry itself.
                cvt(unsafe {
                    libc::linkat(tparent.as_raw_fd(), tc.as_ptr(), pfd, cname.as_ptr(), 0)
                })
                .map_err(|err| match errno(&err) {
                    libc::ENOENT => {
                        self.unsafe_entry(&disp, format!("{role}does not exist in this layer"))
                    }
                    libc::EPERM => self.unsafe_entry(&disp, format!("{role}is a directory")),
                    _ => self.io_err(&disp, "cannot create hard link", err),
                })?;
            }
            T::Char | T::Block => {
                let major = hdr.device_major().ok().flatten().unwrap_or(u32::MAX);
                let minor = hdr.device_minor().ok().flatten().unwrap_or(u32::MAX);
                if kind == T::Char && major == 0 && minor == 0 {
                    self.clear(pfd, &cname, &disp)?;
                    // SAFETY: mknodat(2) of an overlayfs whiteout (char 0:0).
                    cvt(unsafe {
                        libc::mknodat(pfd, cname.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0))
                    })
                    .map_err(|err| self.io_err(&disp, "cannot create whiteout", err))?;
                } else {
                    let what = if kind == T::Char {
                        "character"
                    } else {
                        "block"
                    };
                    return Err(self.unsafe_entry(
                        &disp,
                        format!("is a {what} device {major}:{minor} (device nodes are not allowed in image layers)"),
                    ));
                }
            }
            T::Fifo => {
                self.clear(pfd, &cname, &disp)?;
                // SAFETY: mknodat(2) of a FIFO.
                cvt(unsafe { libc::mknodat(pfd, cname.as_ptr(), libc::S_IFIFO | 0o600, 0) })
                    .map_err(|err| self.io_err(&disp, "cannot create fifo", err))?;
                self.apply_at(pfd, &cname, &meta, true, &disp)?;
            }
            other => {
                return Err(self.unsafe_entry(
                    &disp,
                    format!("has an unsupported tar entry type {:?}", other),
                ));
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Directory owners, modes and mtimes are set last, deepest first, so that creating
    /// their children does not change them afterwards.
    fn finish(&mut self) -> Result<(), ImageError> {
        let dirs = std::mem::take(&mut self.dirs);
        for (comps, meta) in dirs.iter().rev() {
            let disp = show(comps);
            // A directory later replaced by another entry type is skipped.
            if let Ok(fd) = self.walk(comps, false, &disp, "") {
                self.apply_fd(fd.as_raw_fd(), meta, &disp)?;
            }
        }
        if let Some(meta) = self.root_meta.take() {
            self.apply_fd(self.root.as_raw_fd(), &meta, "./")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{ENV_MAX_BYTES, ENV_MAX_LAYER_BYTES, ENV_MAX_LAYER_ENTRIES};
    use std::fs;

    /// A tar whose headers each claim 1 MiB (within budget) and hold it: the third file
    /// crosses the 2.5 MiB budget and must be cut before it is written past it.
    #[test]
    fn content_stops_at_the_byte_budget() {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..3 {
            let mut h = tar::Header::new_gnu();
            h.set_path(format!("f{i}")).unwrap();
            h.set_size(1 << 20);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, &vec![1u8; 1 << 20][..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let limit = (5 << 20) / 2;
        let budgets = LayerBudgets {
            subject: "layer test".into(),
            bytes: Budget::new(
                limit,
                u64::MAX,
                0,
                true,
                (ENV_MAX_LAYER_BYTES, ENV_MAX_BYTES),
            ),
            entries: Budget::new(10, u64::MAX, 0, false, (ENV_MAX_LAYER_ENTRIES, "")),
        };
        let err = extract_layer(&tar[..], dir.path(), "test", &budgets).unwrap_err();
        assert!(err.to_string().contains(ENV_MAX_LAYER_BYTES), "{err}");
        let written: u64 = (0..3)
            .filter_map(|i| fs::metadata(dir.path().join(format!("f{i}"))).ok())
            .map(|m| m.len())
            .sum();
        assert!(written <= limit, "{written} bytes written past {limit}");
    }

    /// An 8 MiB GNU long name (the tar reader would hold it in memory) is refused after
    /// 4 MiB of headers.
    #[test]
    fn huge_entry_headers_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("././@LongLink").unwrap();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(8 << 20);
        h.set_cksum();
        b.append(&h, &vec![b'a'; 8 << 20][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_path("x").unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let budgets = LayerBudgets {
            subject: "layer test".into(),
            bytes: Budget::new(
                1 << 30,
                u64::MAX,
                0,
                true,
                (ENV_MAX_LAYER_BYTES, ENV_MAX_BYTES),
            ),
            entries: Budget::new(10, u64::MAX, 0, false, (ENV_MAX_LAYER_ENTRIES, "")),
        };
        let err = extract_layer(&tar[..], dir.path(), "test", &budgets).unwrap_err();
        assert!(err.to_string().contains("headers of one entry"), "{err}");
    }
}
