//! Image disks for VM containers: an image's layers, flattened, as one read-only erofs
//! file (`$NESTOR_ROOT/vm-disks/<image id>.erofs`), built once with Debian's mkfs.erofs
//! and shared by every VM that runs the image. The guest agent mounts it as the
//! overlay's lower layer. Disks of images that are gone are removed by `nestor gc`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The guest filesystem type of image disks.
pub const FSTYPE: &str = "erofs";

pub fn disks_dir() -> PathBuf {
    crate::docker::store::data_root().join("vm-disks")
}

/// The image's disk, built if missing (under an exclusive lock, so concurrent runs build
/// it once). The id is a content hash, so a disk never goes stale.
pub fn image_disk(image: &nestor_image::Image) -> Result<PathBuf> {
    let dir = disks_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let disk = dir.join(format!("{}.{FSTYPE}", image.id));
    if disk.is_file() {
        return Ok(disk);
    }
    let lock = std::fs::File::create(dir.join(".lock")).context("create the disk lock")?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("lock the disk directory")
        .and_then(|guard| {
            if !disk.is_file() {
                build(image, &disk)?;
            }
            drop(guard);
            Ok(())
        })?;
    Ok(disk)
}

fn mkfs_erofs() -> Result<&'static Path> {
    ["/usr/bin/mkfs.erofs", "/usr/sbin/mkfs.erofs"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("mkfs.erofs not found: install erofs-utils (scripts/setup.sh does)")
}

/// A read-only erofs snapshot of the directory `src` (an OCI bundle's rootfs) at `disk`.
pub fn snapshot_dir(src: &Path, disk: &Path) -> Result<()> {
    let tmp = disk.with_extension("tmp");
    let out = Command::new(mkfs_erofs()?)
        .arg("-T0")
        .arg(&tmp)
        .arg(src)
        .output()
        .context("run mkfs.erofs")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "mkfs.erofs of {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, disk).with_context(|| format!("create {}", disk.display()))
}

fn build(image: &nestor_image::Image, disk: &Path) -> Result<()> {
    if image.layers.is_empty() {
        bail!("image {} has no layers", &image.id[..12]);
    }
    let mkfs = mkfs_erofs()?;
    eprintln_lossy!(
        "nestor: building the VM disk of image {} (once per image)",
        &image.id[..12]
    );
    let tmp = disk.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut c = Command::new(mkfs);
    c.arg("-T0").arg(&tmp);
    if image.layers.len() == 1 {
        c.arg(&image.layers[0]);
    } else {
        // Several layers: mkfs reads a read-only overlay of them (whiteouts applied),
        // mounted in a mount namespace of its own that dies with it.
        let mnt = disk.with_extension("mnt");
        std::fs::create_dir_all(&mnt).with_context(|| format!("create {}", mnt.display()))?;
        let data = std::ffi::CString::new(format!("lowerdir={}", image.overlay_lowerdir()))?;
        let target = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes())?;
        c.arg(&mnt);
        // SAFETY: only raw syscalls between fork and exec, on pre-built C strings.
        unsafe {
            c.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        c"overlay".as_ptr(),
                        target.as_ptr(),
                        c"overlay".as_ptr(),
                        libc::MS_RDONLY,
                        data.as_ptr().cast(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = c.output().context("run mkfs.erofs")?;
    let _ = std::fs::remove_dir(disk.with_extension("mnt"));
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "mkfs.erofs failed for image {}: {}",
            &image.id[..12],
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, disk).with_context(|| format!("create {}", disk.display()))?;
    Ok(())
}

/// Removes disks whose image is no longer in the store; returns how many.
pub fn gc(images: &nestor_image::ImageStore) -> Result<usize> {
    let dir = disks_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let live: std::collections::BTreeSet<String> =
        images.list()?.into_iter().map(|s| s.id).collect();
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.split('.').next() else {
            continue;
        };
        if name.starts_with('.') || live.contains(id) {
            continue;
        }
        if std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}
