//! Integration tests of the image store against real files, real tarballs (built here
//! with the tar crate's low-level header API, or by podman), real overlayfs mounts and
//! the busybox sample image built by `images/build-busybox-image.sh`. Run as root; every
//! test uses its own temp dirs and unique podman names, so they run in parallel.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nestor_image::{ImageError, ImageStore, Removed};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------
// helpers

fn sample_layout() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/build-busybox-image.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run build-busybox-image.sh");
        assert!(
            out.status.success(),
            "build-busybox-image.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let last = stdout
            .lines()
            .last()
            .expect("script printed nothing")
            .trim()
            .to_string();
        let p = PathBuf::from(last);
        assert!(
            p.is_absolute() && p.join("index.json").is_file(),
            "{}",
            p.display()
        );
        p
    })
    .clone()
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes an OCI layout at `dir` with the given layer blobs (each stored as is; diff_ids
/// are computed from `diff_tars`, the uncompressed tars) and the given ref name.
fn write_layout(
    dir: &Path,
    blobs: &[(Vec<u8>, &str)],
    diff_tars: &[Vec<u8>],
    ref_name: &str,
    cmd: &str,
) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let put = |b: &[u8]| {
        let h = sha256_hex(b);
        fs::write(dir.join("blobs/sha256").join(&h), b).unwrap();
        format!("sha256:{h}")
    };
    let diff_ids: Vec<String> = diff_tars
        .iter()
        .map(|t| format!("sha256:{}", sha256_hex(t)))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2025-01-01T00:00:00Z",
        "config": {"Cmd": [cmd], "Env": ["PATH=/bin"], "WorkingDir": "/tmp", "User": "65534",
                   "ExposedPorts": {"80/tcp": {}}, "Labels": {"k": "v"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_b = serde_json::to_vec(&config).unwrap();
    let layers: Vec<_> = blobs
        .iter()
        .map(|(b, mt)| serde_json::json!({"mediaType": mt, "digest": put(b), "size": b.len()}))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config_b), "size": config_b.len()},
        "layers": layers,
    });
    let manifest_b = serde_json::to_vec(&manifest).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": put(&manifest_b), "size": manifest_b.len(),
                       "annotations": {"org.opencontainers.image.ref.name": ref_name}}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// One layer of uncompressed tar entries, as an OCI layout at `dir`.
fn single_layer_layout(dir: &Path, tar: Vec<u8>) {
    write_layout(
        dir,
        &[(tar.clone(), "application/vnd.oci.image.layer.v1.tar")],
        &[tar],
        "hostile",
        "sh",
    );
}

/// Builds tars entry by entry with raw header fields, so hostile names (`..`, absolute)
/// that the tar crate's safe setters refuse can be written.
struct RawTar(tar::Builder<Vec<u8>>);

impl RawTar {
    fn new() -> Self {
        RawTar(tar::Builder::new(Vec::new()))
    }

    fn add(
        &mut self,
        path: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        data: &[u8],
        mode: u32,
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..path.len()].copy_from_slice(path);
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.add(path.as_bytes(), tar::EntryType::Regular, b"", data, 0o644)
    }
    fn dir(&mut self, path: &str) -> &mut Self {
        self.add(path.as_bytes(), tar::EntryType::Directory, b"", b"", 0o755)
    }
    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(
            path.as_bytes(),
            tar::EntryType::Symlink,
            target.as_bytes(),
            b"",
            0o777,
        )
    }
    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(
            path.as_bytes(),
            tar::EntryType::Link,
            target.as_bytes(),
            b"",
            0o644,
        )
    }
    fn device(&mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.0.append(&h, &b""[..]).unwrap();
        self
    }
    /// A pax extended header ('x') applying `records` to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.add(
            b"PaxHeaders/entry",
            tar::EntryType::XHeader,
            b"",
            &data,
            0o644,
        )
    }
    fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

/// A test area: `store/` for the image store, `sentinel/` that no import may touch.
struct Area {
    dir: TempDir,
}

impl Area {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nestor-image-test-")
            .tempdir()
            .unwrap();
        fs::create_dir(dir.path().join("sentinel")).unwrap();
        fs::write(dir.path().join("sentinel/target"), b"precious").unwrap();
        Area { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn sentinel(&self) -> PathBuf {
        self.path().join("sentinel")
    }
    fn store(&self) -> ImageStore {
        ImageStore::open(&self.path().join("store")).unwrap()
    }
    fn assert_untouched(&self) {
        assert_eq!(
            dir_entries(&self.sentinel()),
            vec!["target".to_string()],
            "sentinel dir was written"
        );
        let t = fs::metadata(self.sentinel().join("target")).unwrap();
        assert_eq!(t.nlink(), 1, "sentinel file got a hard link");
        assert_eq!(
            fs::read(self.sentinel().join("target")).unwrap(),
            b"precious"
        );
        assert_eq!(
            dir_entries(self.path()),
            vec![
                "layout".to_string(),
                "sentinel".to_string(),
                "store".to_string()
            ],
            "something was written next to the store"
        );
        // A refused layer leaves nothing behind in the store.
        assert!(dir_entries(&self.path().join("store/layers")).is_empty());
        assert!(dir_entries(&self.path().join("store/images")).is_empty());
        assert!(dir_entries(&self.path().join("store/tmp")).is_empty());
    }

    /// Imports a one-layer layout made of `tar` and returns the result.
    fn import_tar(&self, tar: Vec<u8>) -> Result<Vec<nestor_image::ImageSummary>, ImageError> {
        let layout = self.path().join("layout");
        single_layer_layout(&layout, tar);
        self.store().import(&layout, None, &mut quiet())
    }
}

fn expect_refused(area: &Area, tar: Vec<u8>, entry: &str, reason: &str) {
    let err = area
        .import_tar(tar)
        .expect_err("hostile layer was accepted");
    let msg = err.to_string();
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{msg}");
    assert!(
        msg.contains(&format!("entry '{entry}'")),
        "error does not name the entry: {msg}"
    );
    assert!(
        msg.contains(reason),
        "error does not say why ({reason}): {msg}"
    );
    eprintln!("refused as expected: {msg}");
    area.assert_untouched();
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mount_overlay(img: &nestor_image::Image, base: &Path) -> Mount {
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    let opts = img.overlay_mount_data(&upper, &work).unwrap();
    assert!(opts.starts_with(&format!("lowerdir={},", img.overlay_lowerdir())));
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount overlay {opts}: {e}"));
    Mount(merged)
}

// ---------------------------------------------------------------------------------------
// importing the sample

#[test]
fn imports_sample_layout_with_whiteouts_in_overlay_form() {
    let area = Area::new();
    let store = area.store();
    let mut lines = Vec::new();
    let got = store
        .import(&sample_layout(), None, &mut |l| lines.push(l.to_string()))
        .unwrap();
    assert_eq!(got.len(), 1);
    let s = &got[0];
    assert_eq!(s.names, vec!["localhost/busybox:latest".to_string()]);
    assert_eq!(s.layers, 2);
    assert!(s.size > 500_000, "busybox is bigger than {}", s.size);
    assert_eq!(s.created.as_deref(), Some("2024-01-01T00:00:00Z"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("layer 1/2 sha256:") && l.ends_with("extracted")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("layer 2/2 sha256:")),
        "{lines:?}"
    );

    for q in [
        "busybox",
        "busybox:latest",
        "localhost/busybox:latest",
        &s.id,
        &s.id[..8],
        &format!("sha256:{}", s.id),
    ] {
        assert_eq!(store.get(q).unwrap().id, s.id, "lookup by {q}");
    }
    let img = store.get("busybox").unwrap();
    assert_eq!(img.config.cmd, vec!["sh"]);
    assert!(img.config.env.iter().any(|e| e.starts_with("PATH=")));
    assert_eq!(img.command(&[]), vec!["sh"]);
    assert_eq!(
        img.command(&["echo".into(), "hi".into()]),
        vec!["echo", "hi"]
    );
    assert_eq!(img.layers.len(), 2);
    let (base, top) = (&img.layers[0], &img.layers[1]);
    assert_eq!(
        img.overlay_lowerdir(),
        format!("{}:{}", top.display(), base.display())
    );

    // Base layer: the binary, applet symlinks stored as is (absolute, not followed).
    let bb = fs::metadata(base.join("bin/busybox")).unwrap();
    assert!(bb.is_file() && bb.mode() & 0o777 == 0o755 && bb.uid() == 0);
    assert_eq!(bb.mtime(), 1704067200);
    assert_eq!(
        fs::read_link(base.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        fs::metadata(base.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        fs::metadata(base.join("root")).unwrap().mode() & 0o7777,
        0o700
    );
    assert!(fs::read_to_string(base.join("etc/passwd"))
        .unwrap()
        .contains("nobody:x:65534"));

    // Top layer: .wh.motd became a char 0:0 device, .wh..wh..opq an xattr.
    let wh = fs::symlink_metadata(top.join("etc/motd")).unwrap();
    assert!(
        wh.file_type().is_char_device(),
        "whiteout is not a char device"
    );
    assert_eq!(wh.rdev(), 0);
    assert!(!top.join("etc/.wh.motd").exists());
    assert!(!top.join("var/cache/sample/.wh..wh..opq").exists());
    let out = Command::new("getfattr")
        .args([
            "--absolute-names",
            "-n",
            "trusted.overlay.opaque",
            "--only-values",
        ])
        .arg(top.join("var/cache/sample"))
        .output();
    match out {
        Ok(o) if o.status.success() => assert_eq!(o.stdout, b"y"),
        _ => {
            // getfattr (attr package) may be missing: read the xattr directly.
            let p = std::ffi::CString::new(
                top.join("var/cache/sample")
                    .into_os_string()
                    .into_encoded_bytes(),
            )
            .unwrap();
            let mut buf = [0u8; 8];
            // SAFETY: getxattr writes at most buf.len() bytes.
            let n = unsafe {
                libc::getxattr(
                    p.as_ptr(),
                    c"trusted.overlay.opaque".as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            assert_eq!(n, 1, "opaque xattr missing");
            assert_eq!(buf[0], b'y');
        }
    }

    // Store hygiene: mode 0700 root, nothing left in staging.
    assert_eq!(
        fs::metadata(area.path().join("store")).unwrap().mode() & 0o777,
        0o700
    );
    assert!(dir_entries(&area.path().join("store/tmp")).is_empty());

    // A second import finds everything present.
    let mut lines = Vec::new();
    let again = store
        .import(&sample_layout(), None, &mut |l| lines.push(l.to_string()))
        .unwrap();
    assert_eq!(again[0].id, s.id);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.ends_with("already present"))
            .count(),
        2,
        "{lines:?}"
    );
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn sample_layers_stack_as_overlayfs_lowerdirs() {
    let area = Area::new();
    let store = area.store();
    store.import(&sample_layout(), None, &mut quiet()).unwrap();
    let img = store.get("busybox").unwrap();
    let mnt = mount_overlay(&img, &area.path().join("ovl"));
    let m = &mnt.0;
    assert!(m.join("bin/busybox").is_file());
    assert!(
        !m.join("etc/motd").exists(),
        "whiteout did not hide etc/motd"
    );
    assert!(m.join("etc/nestor-sample").is_file());
    assert_eq!(
        dir_entries(&m.join("var/cache/sample")),
        vec!["new".to_string()],
        "opaque dir shows lower content"
    );

    // Run the image's shell in it: the stacked rootfs works.
    let out = Command::new("chroot")
        .arg(m)
        .args(["/bin/sh", "-c", "cat /etc/hostname; ls /var/cache/sample; test -e /etc/motd || echo nomotd; echo written > /tmp/w"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "busybox\nnew\nnomotd\n"
    );
    // Writes land in the upper dir, never in the store.
    assert_eq!(
        fs::read(area.path().join("ovl/upper/tmp/w")).unwrap(),
        b"written\n"
    );
    assert!(img.layers.iter().all(|l| !l.join("tmp/w").exists()));
    drop(mnt);

    let bad = img
        .overlay_mount_data(Path::new("/a,b"), Path::new("/w"))
        .unwrap_err()
        .to_string();
    assert!(bad.contains("contains ':' or ','"), "{bad}");
}

#[test]
fn imports_own_tarball_of_layout_plain_and_gzipped() {
    let area = Area::new();
    let store = area.store();
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", sample_layout()).unwrap();
    let plain = b.into_inner().unwrap();
    let tar_path = area.path().join("busybox-oci.tar");
    fs::write(&tar_path, &plain).unwrap();
    let mut lines = Vec::new();
    let a = store
        .import(&tar_path, Some("from-tar:v1"), &mut |l| {
            lines.push(l.to_string())
        })
        .unwrap();
    assert!(lines[0].starts_with("importing oci-archive"), "{lines:?}");
    assert_eq!(a[0].names, vec!["localhost/from-tar:v1".to_string()]);

    let gz_path = area.path().join("busybox-oci.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(
        fs::File::create(&gz_path).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(&plain).unwrap();
    enc.finish().unwrap();
    let g = store.import(&gz_path, None, &mut quiet()).unwrap();
    assert_eq!(g[0].id, a[0].id);
    // Same image: both names on it, the layers extracted once.
    let names: BTreeSet<String> = store.get(&a[0].id).unwrap().names.into_iter().collect();
    assert_eq!(
        names,
        ["localhost/busybox:latest", "localhost/from-tar:v1"]
            .map(String::from)
            .into()
    );
    assert_eq!(dir_entries(&area.path().join("store/layers")).len(), 2);
    assert!(
        dir_entries(&area.path().join("store/tmp")).is_empty(),
        "decompressed archive left in tmp"
    );
}

/// podman loads the sample and saves it as oci-archive and docker-archive; both import
/// and share the layers with the layout import.
#[test]
fn imports_podman_oci_archive_and_docker_archive() {
    let area = Area::new();
    let name = unique("nestor-image-test");
    let full = format!("localhost/{name}:latest");
    // The sample with a unique ref name (index.json is not content-addressed).
    let layout = area.path().join("podman-in");
    fs::create_dir(&layout).unwrap();
    let src = sample_layout();
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all("blobs", src.join("blobs")).unwrap();
    b.append_path_with_name(src.join("oci-layout"), "oci-layout")
        .unwrap();
    let index = fs::read_to_string(src.join("index.json"))
        .unwrap()
        .replace("\"busybox:latest\"", &format!("\"{name}:latest\""));
    let mut h = tar::Header::new_gnu();
    h.set_size(index.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "index.json", index.as_bytes())
        .unwrap();
    let in_tar = layout.join("in.tar");
    fs::write(&in_tar, b.into_inner().unwrap()).unwrap();

    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("podman")
                .args(["rmi", "--force", &self.0])
                .output();
        }
    }
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .args(args)
            .output()
            .expect("podman is installed");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    podman(&["load", "-q", "-i", in_tar.to_str().unwrap()]);
    let _cleanup = Cleanup(full.clone());
    let oci = area.path().join("oci-archive.tar");
    let docker = area.path().join("docker-archive.tar");
    podman(&[
        "save",
        "-q",
        "--format",
        "oci-archive",
        "-o",
        oci.to_str().unwrap(),
        &full,
    ]);
    podman(&[
        "save",
        "-q",
        "--format",
        "docker-archive",
        "-o",
        docker.to_str().unwrap(),
        &full,
    ]);

    let store = area.store();
    let from_layout = store
        .import(&sample_layout(), None, &mut quiet())
        .unwrap()
        .remove(0);

    let mut lines = Vec::new();
    let o = store
        .import(&oci, None, &mut |l| lines.push(l.to_string()))
        .unwrap()
        .remove(0);
    assert!(lines[0].starts_with("importing oci-archive"), "{lines:?}");
    // Same config as the sample: the same image, now with both names.
    assert_eq!(o.id, from_layout.id);
    assert!(o.names.contains(&full), "{:?}", o.names);
    let mut lines = Vec::new();
    let d = store
        .import(&docker, None, &mut |l| lines.push(l.to_string()))
        .unwrap()
        .remove(0);
    assert!(
        lines[0].starts_with("importing docker-archive"),
        "{lines:?}"
    );
    assert!(d.names.contains(&full), "{:?}", d.names);

    // Same layers (podman recompressed them, but diff_ids are of the content).
    let layers: Vec<_> = [&from_layout.id, &o.id, &d.id]
        .iter()
        .map(|id| store.get(id).unwrap().layers)
        .collect();
    assert_eq!(layers[0], layers[1]);
    assert_eq!(layers[0], layers[2]);
    assert_eq!(dir_entries(&area.path().join("store/layers")).len(), 2);
    let img = store.get(&name).unwrap();
    assert_eq!(img.config.cmd, vec!["sh"]);
}

// ---------------------------------------------------------------------------------------
// corrupt and unknown input

fn copy_layout(to: &Path) {
    let src = sample_layout();
    fs::create_dir_all(to.join("blobs/sha256")).unwrap();
    for f in ["index.json", "oci-layout"] {
        fs::copy(src.join(f), to.join(f)).unwrap();
    }
    for e in fs::read_dir(src.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join("blobs/sha256").join(e.file_name())).unwrap();
    }
}

fn manifest_of(layout: &Path) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let d = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(d)).unwrap()).unwrap()
}

#[test]
fn corrupt_layer_blob_is_rejected_naming_its_digest() {
    let area = Area::new();
    let layout = area.path().join("layout");
    copy_layout(&layout);
    let digest = manifest_of(&layout)["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&blob, bytes).unwrap();
    let err = area
        .store()
        .import(&layout, None, &mut quiet())
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{msg}");
    assert!(
        msg.contains(&digest) && msg.contains("digest mismatch (file is corrupt)"),
        "{msg}"
    );
    area.assert_untouched();
}

#[test]
fn corrupt_config_and_truncated_blob_are_rejected() {
    let area = Area::new();
    let layout = area.path().join("layout");
    copy_layout(&layout);
    let m = manifest_of(&layout);
    let cfg = m["config"]["digest"].as_str().unwrap().to_string();
    let cfg_path = layout
        .join("blobs/sha256")
        .join(cfg.trim_start_matches("sha256:"));
    let text = fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"sh\"", "\"id\"");
    fs::write(&cfg_path, text).unwrap();
    let msg = area
        .store()
        .import(&layout, None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&cfg) && msg.contains("digest mismatch"),
        "{msg}"
    );

    // A missing layer blob.
    copy_layout(&layout);
    let l2 = m["layers"][1]["digest"].as_str().unwrap().to_string();
    fs::remove_file(
        layout
            .join("blobs/sha256")
            .join(l2.trim_start_matches("sha256:")),
    )
    .unwrap();
    let msg = area
        .store()
        .import(&layout, None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert_eq!(msg, format!("blob {l2} is missing from the archive"));
    // The first layer was fine and stays; no image record points at an incomplete image.
    assert!(area.store().list().unwrap().is_empty());
    assert!(dir_entries(&area.path().join("store/tmp")).is_empty());
}

#[test]
fn unknown_formats_are_named() {
    let area = Area::new();
    let store = area.store();
    let junk = area.path().join("junk.bin");
    fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let msg = store
        .import(&junk, None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("unknown archive format:") && msg.contains("junk.bin"),
        "{msg}"
    );
    let empty = area.path().join("emptydir");
    fs::create_dir(&empty).unwrap();
    let msg = store
        .import(&empty, None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("unknown archive format:") && msg.contains("not an OCI image layout"),
        "{msg}"
    );
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_cksum();
    b.append_data(&mut h, "hello.txt", &b"hi"[..]).unwrap();
    let t = area.path().join("other.tar");
    fs::write(&t, b.into_inner().unwrap()).unwrap();
    let msg = store
        .import(&t, None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("neither oci-layout"), "{msg}");
    let msg = store
        .import(&area.path().join("absent"), None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent"), "{msg}");
    assert_eq!(
        store.get("nope").unwrap_err().to_string(),
        "image 'nope' not found"
    );
    let msg = store
        .import(&sample_layout(), Some("Bad Name"), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("invalid image name 'Bad Name'"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// hostile layers

#[test]
fn refuses_dotdot_entry() {
    let area = Area::new();
    let tar = RawTar::new()
        .file("ok", b"x")
        .file("../../../../escaped", b"pwn")
        .finish();
    expect_refused(&area, tar, "../../../../escaped", "escapes the layer root");
    assert!(!area.path().join("escaped").exists());
    let tar = RawTar::new().file("a/../../b", b"pwn").finish();
    expect_refused(&area, tar, "a/../../b", "escapes the layer root");
}

#[test]
fn strips_leading_slash_of_absolute_entries() {
    let area = Area::new();
    let abs = format!("{}/abs", area.sentinel().display());
    let tar = RawTar::new().file(&abs, b"inside").finish();
    let s = area.import_tar(tar).unwrap().remove(0);
    let img = area.store().get(&s.id).unwrap();
    let inside = img.layers[0].join(abs.trim_start_matches('/'));
    assert_eq!(fs::read(inside).unwrap(), b"inside");
    assert_eq!(dir_entries(&area.sentinel()), vec!["target".to_string()]);
}

#[test]
fn refuses_write_through_absolute_symlink() {
    let area = Area::new();
    let tar = RawTar::new()
        .symlink("link", area.sentinel().to_str().unwrap())
        .file("link/pwned", b"pwn")
        .finish();
    expect_refused(&area, tar, "link/pwned", "goes through the symlink 'link'");
}

#[test]
fn refuses_write_through_relative_symlink_and_dir_over_symlink() {
    let area = Area::new();
    let tar = RawTar::new()
        .dir("a")
        .symlink("a/up", "../../../../../sentinel")
        .file("a/up/pwned", b"pwn")
        .finish();
    expect_refused(&area, tar, "a/up/pwned", "goes through the symlink 'a/up'");
    // The classic "a -> /etc, then a/passwd" with a directory entry in between.
    let tar = RawTar::new()
        .symlink("etc", area.sentinel().to_str().unwrap())
        .dir("etc/sub")
        .finish();
    expect_refused(&area, tar, "etc/sub", "symlink 'etc'");
}

/// The extractor starts a walk from the directory the last one reached: a directory it
/// reached (here through an opaque marker, which leaves it empty) and that an entry
/// then replaces with a symlink must not be written into through the old descriptor,
/// nor through the new symlink.
#[test]
fn refuses_write_through_a_symlink_that_replaced_a_walked_directory() {
    let area = Area::new();
    let tar = RawTar::new()
        .dir("a")
        .file("a/.wh..wh..opq", b"")
        .symlink("a", area.sentinel().to_str().unwrap())
        .file("a/pwned", b"pwn")
        .finish();
    expect_refused(&area, tar, "a/pwned", "goes through the symlink 'a'");
}

#[test]
fn replaces_symlink_with_file_instead_of_writing_through_it() {
    let area = Area::new();
    let target = area.sentinel().join("target");
    let tar = RawTar::new()
        .symlink("f", target.to_str().unwrap())
        .file("f", b"mine")
        .finish();
    let s = area.import_tar(tar).unwrap().remove(0);
    let layer = &area.store().get(&s.id).unwrap().layers[0];
    let m = fs::symlink_metadata(layer.join("f")).unwrap();
    assert!(m.is_file());
    assert_eq!(fs::read(layer.join("f")).unwrap(), b"mine");
    assert_eq!(fs::read(&target).unwrap(), b"precious");
}

#[test]
fn refuses_hard_links_out_of_the_layer() {
    let area = Area::new();
    let tar = RawTar::new()
        .hardlink("hl", "../../../../sentinel/target")
        .finish();
    expect_refused(&area, tar, "hl", "escapes the layer root");
    // Absolute target: stripped to etc/passwd of the layer, which does not exist.
    let tar = RawTar::new().hardlink("hl", "/etc/passwd").finish();
    expect_refused(&area, tar, "hl", "does not exist in this layer");
    // Through a symlinked directory.
    let tar = RawTar::new()
        .symlink("s", area.sentinel().to_str().unwrap())
        .hardlink("hl", "s/target")
        .finish();
    expect_refused(&area, tar, "hl", "goes through the symlink 's'");
}

#[test]
fn hard_links_inside_the_layer_work() {
    let area = Area::new();
    let tar = RawTar::new()
        .file("bin/a", b"same")
        .hardlink("bin/b", "bin/a")
        .finish();
    let s = area.import_tar(tar).unwrap().remove(0);
    let layer = &area.store().get(&s.id).unwrap().layers[0];
    let (a, b) = (
        fs::metadata(layer.join("bin/a")).unwrap(),
        fs::metadata(layer.join("bin/b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
}

#[test]
fn refuses_device_nodes_but_keeps_whiteout_devices_and_fifos() {
    let area = Area::new();
    let tar = RawTar::new()
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .finish();
    expect_refused(&area, tar, "dev/null", "is a character device 1:3");
    let tar = RawTar::new()
        .device("dev/sda", tar::EntryType::Block, 8, 0)
        .finish();
    expect_refused(&area, tar, "dev/sda", "is a block device 8:0");

    let tar = RawTar::new()
        .device("gone", tar::EntryType::Char, 0, 0)
        .add(b"pipe", tar::EntryType::Fifo, b"", b"", 0o640)
        .finish();
    let s = area.import_tar(tar).unwrap().remove(0);
    let layer = &area.store().get(&s.id).unwrap().layers[0];
    let g = fs::symlink_metadata(layer.join("gone")).unwrap();
    assert!(g.file_type().is_char_device() && g.rdev() == 0);
    let p = fs::symlink_metadata(layer.join("pipe")).unwrap();
    assert!(p.file_type().is_fifo());
    assert_eq!(p.permissions().mode() & 0o777, 0o640);
}

#[test]
fn keeps_setuid_bits_and_owners() {
    let area = Area::new();
    let mut t = RawTar::new();
    t.add(b"bin/su", tar::EntryType::Regular, b"", b"#!", 0o4755);
    let mut h = tar::Header::new_gnu();
    h.set_path("home/nobody/f").unwrap();
    h.set_size(1);
    h.set_mode(0o600);
    h.set_uid(65534);
    h.set_gid(65534);
    h.set_cksum();
    t.0.append(&h, &b"x"[..]).unwrap();
    let s = area.import_tar(t.finish()).unwrap().remove(0);
    let layer = &area.store().get(&s.id).unwrap().layers[0];
    assert_eq!(
        fs::metadata(layer.join("bin/su")).unwrap().mode() & 0o7777,
        0o4755
    );
    let f = fs::metadata(layer.join("home/nobody/f")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o777), (65534, 65534, 0o600));
}

/// Files are created with their final permission bits where the umask allows, and
/// the chown/chmod that would set what a new file already has are skipped: every mode
/// (group and other write, setuid, setgid, sticky, none at all), a group that differs
/// from the extractor's, and the mtime must still come out as the entry says.
#[test]
fn fresh_files_get_every_mode_owner_and_mtime() {
    let area = Area::new();
    let mut t = RawTar::new();
    let modes = [
        0o644, 0o755, 0o600, 0o400, 0o000, 0o666, 0o777, 0o620, 0o2755, 0o1755, 0o4711,
    ];
    for m in modes {
        t.add(
            format!("f{m:o}").as_bytes(),
            tar::EntryType::Regular,
            b"",
            b"x",
            m,
        );
    }
    let mut h = tar::Header::new_gnu();
    h.set_path("grp").unwrap();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(50);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    t.0.append(&h, &b"y"[..]).unwrap();
    let s = area.import_tar(t.finish()).unwrap().remove(0);
    let layer = &area.store().get(&s.id).unwrap().layers[0];
    for m in modes {
        let md = fs::metadata(layer.join(format!("f{m:o}"))).unwrap();
        assert_eq!(md.mode() & 0o7777, m, "mode of f{m:o}");
        assert_eq!((md.uid(), md.gid()), (0, 0), "owner of f{m:o}");
        assert_eq!(md.mtime(), 1_700_000_000, "mtime of f{m:o}");
    }
    let g = fs::metadata(layer.join("grp")).unwrap();
    assert_eq!(
        (g.uid(), g.gid(), g.mode() & 0o7777, g.mtime()),
        (0, 50, 0o644, 1_600_000_000)
    );
}

#[test]
fn garbage_layer_is_a_clear_error() {
    let area = Area::new();
    let err = area.import_tar(vec![7u8; 1536]).unwrap_err().to_string();
    assert!(err.contains("not a readable tar stream"), "{err}");
    assert!(dir_entries(&area.path().join("store/layers")).is_empty());
    assert!(dir_entries(&area.path().join("store/tmp")).is_empty());
}

// ---------------------------------------------------------------------------------------
// names, removal, concurrency

/// A second image sharing the sample's base layer, with its own top layer.
fn derived_layout(dir: &Path) {
    let src = sample_layout();
    let m = manifest_of(&src);
    let base_digest = m["layers"][0]["digest"].as_str().unwrap();
    let base_gz = fs::read(
        src.join("blobs/sha256")
            .join(base_digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    let mut base_tar = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&base_gz[..]),
        &mut base_tar,
    )
    .unwrap();
    let top = RawTar::new().file("etc/derived", b"yes").finish();
    write_layout(
        dir,
        &[
            (base_gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (top.clone(), "application/vnd.oci.image.layer.v1.tar"),
        ],
        &[base_tar, top],
        "derived:1",
        "true",
    );
}

#[test]
fn remove_keeps_layers_shared_with_other_images() {
    let area = Area::new();
    let store = area.store();
    let bb = store
        .import(&sample_layout(), None, &mut quiet())
        .unwrap()
        .remove(0);
    let derived = area.path().join("derived");
    derived_layout(&derived);
    let d = store
        .import(&derived, None, &mut quiet())
        .unwrap()
        .remove(0);
    assert_eq!(d.names, vec!["localhost/derived:1".to_string()]);
    let dimg = store.get("derived:1").unwrap();
    assert_eq!(
        dimg.layers[0],
        store.get("busybox").unwrap().layers[0],
        "base layer not shared"
    );
    assert_eq!(dimg.config.user.as_deref(), Some("65534"));
    assert_eq!(dimg.config.working_dir.as_deref(), Some("/tmp"));
    assert_eq!(dimg.config.exposed_ports, vec!["80/tcp"]);
    assert_eq!(dimg.config.labels.get("k").map(String::as_str), Some("v"));
    assert_eq!(dir_entries(&area.path().join("store/layers")).len(), 3);

    assert_eq!(
        store.remove("busybox").unwrap(),
        Removed::Deleted {
            id: bb.id.clone(),
            layers_removed: 1
        }
    );
    assert_eq!(
        store.get("busybox").unwrap_err().to_string(),
        "image 'busybox' not found"
    );
    let dimg2 = store.get("derived:1").unwrap();
    assert!(dimg2.layers.iter().all(|l| l.join("etc").is_dir()));
    assert!(dimg2.layers[0].join("bin/busybox").is_file());
    assert_eq!(dir_entries(&area.path().join("store/layers")).len(), 2);

    assert!(matches!(
        store.remove(&d.id[..10]).unwrap(),
        Removed::Deleted {
            layers_removed: 2,
            ..
        }
    ));
    assert!(dir_entries(&area.path().join("store/layers")).is_empty());
    assert!(dir_entries(&area.path().join("store/blobs/sha256")).is_empty());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn names_move_and_untag_before_delete() {
    let area = Area::new();
    let store = area.store();
    let a = store
        .import(&sample_layout(), Some("first"), &mut quiet())
        .unwrap()
        .remove(0);
    store
        .import(&sample_layout(), Some("second:v2"), &mut quiet())
        .unwrap();
    let names: BTreeSet<_> = store.get(&a.id).unwrap().names.into_iter().collect();
    assert_eq!(
        names,
        ["localhost/first:latest", "localhost/second:v2"]
            .map(String::from)
            .into()
    );

    // "first" moves to the derived image; the sample keeps "second:v2".
    let derived = area.path().join("derived");
    derived_layout(&derived);
    let d = store
        .import(&derived, Some("localhost/first"), &mut quiet())
        .unwrap()
        .remove(0);
    assert_eq!(store.get("first").unwrap().id, d.id);
    assert_eq!(
        store.get(&a.id).unwrap().names,
        vec!["localhost/second:v2".to_string()]
    );

    // Ambiguous id prefix: both ids start with some hex digit; a 0-length-safe query.
    let common: usize =
        a.id.chars()
            .zip(d.id.chars())
            .take_while(|(x, y)| x == y)
            .count();
    if common > 0 {
        let msg = store.get(&a.id[..common]).unwrap_err().to_string();
        assert!(msg.contains("ambiguous"), "{msg}");
    }

    store
        .import(&sample_layout(), Some("third"), &mut quiet())
        .unwrap();
    assert_eq!(
        store.remove("third").unwrap(),
        Removed::Untagged("localhost/third:latest".into())
    );
    assert_eq!(store.get("second:v2").unwrap().id, a.id);
    assert!(matches!(
        store.remove("second:v2").unwrap(),
        Removed::Deleted { .. }
    ));
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn concurrent_imports_of_the_same_image() {
    let area = Area::new();
    let root = area.path().join("store");
    let layout = sample_layout();
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (root, layout) = (root.clone(), layout.clone());
            std::thread::spawn(move || {
                ImageStore::open(&root)
                    .unwrap()
                    .import(&layout, None, &mut |_| {})
            })
        })
        .collect();
    let ids: BTreeSet<String> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap().remove(0).id)
        .collect();
    assert_eq!(ids.len(), 1);
    let store = area.store();
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(dir_entries(&root.join("layers")).len(), 2);
    assert!(dir_entries(&root.join("tmp")).is_empty());
    assert!(store.get("busybox").unwrap().layers[0]
        .join("bin/busybox")
        .is_file());
}

#[test]
fn gc_clears_leftovers_of_an_interrupted_import() {
    let area = Area::new();
    let store = area.store();
    store.import(&sample_layout(), None, &mut quiet()).unwrap();
    // What a killed import leaves: a half-extracted layer in tmp/, and an unreferenced
    // layer dir and blob (as if killed before writing its image record).
    let root = area.path().join("store");
    fs::create_dir_all(root.join("tmp/layer-0123-dead/diff/etc")).unwrap();
    fs::create_dir_all(root.join("layers").join("f".repeat(64)).join("diff")).unwrap();
    fs::write(root.join("blobs/sha256").join("e".repeat(64)), b"{}").unwrap();
    let r = store.gc().unwrap();
    assert_eq!(
        (r.staging_removed, r.layers_removed, r.blobs_removed),
        (1, 1, 1)
    );
    assert!(dir_entries(&root.join("tmp")).is_empty());
    assert_eq!(dir_entries(&root.join("layers")).len(), 2);
    assert!(store.get("busybox").is_ok());
    let perms = fs::metadata(&root).unwrap().permissions();
    assert_eq!(perms.mode() & 0o777, 0o700);
}

#[test]
fn keeps_user_and_capability_xattrs_drops_trusted_ones() {
    let area = Area::new();
    // VFS_CAP_REVISION_2 with the effective flag, permitted = CAP_NET_RAW (bit 13).
    let mut cap = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00];
    cap.resize(20, 0);
    let tar = RawTar::new()
        .pax(&[
            ("SCHILY.xattr.user.note", b"hello"),
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ])
        .file("bin/ping", b"\x7fELF")
        .pax(&[("SCHILY.xattr.trusted.overlay.redirect", b"/etc")])
        .dir("forged")
        .finish();
    let s = area.import_tar(tar).unwrap().remove(0);
    let layer = &area.store().get(&s.id).unwrap().layers[0];
    let get = |p: &Path, name: &std::ffi::CStr| -> Option<Vec<u8>> {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let mut buf = vec![0u8; 64];
        // SAFETY: lgetxattr writes at most buf.len() bytes.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    };
    let ping = layer.join("bin/ping");
    assert_eq!(get(&ping, c"user.note").as_deref(), Some(&b"hello"[..]));
    assert_eq!(get(&ping, c"security.capability"), Some(cap));
    assert_eq!(get(&ping, c"trusted.overlay.opaque"), None);
    assert_eq!(
        get(&layer.join("forged"), c"trusted.overlay.redirect"),
        None
    );
}

#[test]
fn imports_zstd_layers_and_long_names() {
    let area = Area::new();
    let long = format!("{}/file", "d".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_mtime(1);
    b.append_data(&mut h, &long, &b"long"[..]).unwrap();
    let plain = b.into_inner().unwrap();
    let zst =
        ruzstd::encoding::compress_to_vec(&plain[..], ruzstd::encoding::CompressionLevel::Fastest);
    assert_ne!(zst, plain);
    let layout = area.path().join("layout");
    write_layout(
        &layout,
        &[(zst, "application/vnd.oci.image.layer.v1.tar+zstd")],
        &[plain],
        "zst",
        "sh",
    );
    let s = area
        .store()
        .import(&layout, None, &mut quiet())
        .unwrap()
        .remove(0);
    let layer = &area.store().get("zst").unwrap().layers[0];
    assert_eq!(s.size, 4);
    assert_eq!(fs::read(layer.join(&long)).unwrap(), b"long");
}

#[test]
fn refuses_nameless_whiteout() {
    let area = Area::new();
    let tar = RawTar::new().file("etc/.wh..", b"").finish();
    expect_refused(&area, tar, "etc/.wh..", "whiteout with no valid name");
}

/// A docker-archive in the legacy `docker save` shape, made here: `<v1id>/layer.tar`
/// symlinks to the layer files, the config named by its digest.
fn write_docker_archive(path: &Path, tamper_config: bool) -> String {
    let src = sample_layout();
    let m = manifest_of(&src);
    let blob = |d: &str| {
        fs::read(
            src.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let cfg_digest = m["config"]["digest"].as_str().unwrap();
    let mut cfg = blob(cfg_digest);
    if tamper_config {
        cfg = String::from_utf8(cfg)
            .unwrap()
            .replace("\"sh\"", "\"id\"")
            .into_bytes();
    }
    let cfg_name = format!("{}.json", cfg_digest.trim_start_matches("sha256:"));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o444);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add(&cfg_name, &cfg);
    let mut layer_paths = Vec::new();
    let mut links = Vec::new();
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        let raw = blob(l["digest"].as_str().unwrap());
        let mut tar_bytes = Vec::new();
        if raw.starts_with(&[0x1f, 0x8b]) {
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut tar_bytes)
                .unwrap();
        } else {
            tar_bytes = raw;
        }
        let file = format!("{}.tar", sha256_hex(&tar_bytes));
        add(&file, &tar_bytes);
        let v1 = format!("{:064x}", i + 1);
        links.push((format!("{v1}/layer.tar"), format!("../{file}")));
        layer_paths.push(format!("{v1}/layer.tar"));
    }
    let manifest =
        serde_json::json!([{"Config": cfg_name, "RepoTags": ["legacy:1"], "Layers": layer_paths}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    for (name, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, name, target).unwrap();
    }
    fs::write(path, b.into_inner().unwrap()).unwrap();
    cfg_digest.to_string()
}

#[test]
fn imports_legacy_docker_archive_and_rejects_tampered_config() {
    let area = Area::new();
    let store = area.store();
    let good = area.path().join("docker.tar");
    let cfg = write_docker_archive(&good, false);
    let mut lines = Vec::new();
    let s = store
        .import(&good, None, &mut |l| lines.push(l.to_string()))
        .unwrap()
        .remove(0);
    assert!(
        lines[0].starts_with("importing docker-archive"),
        "{lines:?}"
    );
    assert_eq!(s.names, vec!["localhost/legacy:1".to_string()]);
    assert_eq!(format!("sha256:{}", s.id), cfg);
    assert!(store.get("legacy:1").unwrap().layers[0]
        .join("bin/busybox")
        .is_file());

    let bad = area.path().join("docker-bad.tar");
    write_docker_archive(&bad, true);
    let fresh = ImageStore::open(&area.path().join("store2")).unwrap();
    let err = fresh
        .import(&bad, None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&cfg) && err.contains("digest mismatch"),
        "{err}"
    );
}

/// Not a test by itself: the importer process that
/// `kill_9_mid_import_leaves_nothing_taken_as_complete` starts and kills.
#[test]
#[ignore = "helper process for kill_9_mid_import_leaves_nothing_taken_as_complete"]
fn helper_import_process() {
    let args = std::env::var("NESTOR_IMAGE_TEST_CHILD").expect("run by the kill test only");
    let (root, layout) = args.split_once('\n').unwrap();
    let _ = ImageStore::open(Path::new(root))
        .unwrap()
        .import(Path::new(layout), None, &mut |_| {});
}

#[test]
fn kill_9_mid_import_leaves_nothing_taken_as_complete() {
    let area = Area::new();
    let root = area.path().join("store");
    ImageStore::open(&root).unwrap();
    // A layer with one 512 MiB file of zeros; the blob is a sparse file, so it costs no
    // disk to make, but takes the importer a while to hash and write.
    let layout = area.path().join("layout");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let size: u64 = 512 << 20;
    let mut h = tar::Header::new_gnu();
    h.set_path("big").unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_cksum();
    let blob_tmp = layout.join("blob.tmp");
    {
        let mut f = fs::File::create(&blob_tmp).unwrap();
        f.write_all(h.as_bytes()).unwrap();
        f.set_len(512 + size + 1024).unwrap();
    }
    // The digests are not checked before the end of the layer, and the importer is
    // killed before that: any well-formed digest will do.
    let fake = "ab".repeat(32);
    fs::rename(&blob_tmp, layout.join("blobs/sha256").join(&fake)).unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{fake}")]}});
    let config_b = serde_json::to_vec(&config).unwrap();
    let ch = sha256_hex(&config_b);
    fs::write(layout.join("blobs/sha256").join(&ch), &config_b).unwrap();
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{ch}"), "size": config_b.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{fake}"), "size": 512 + size + 1024}]});
    let manifest_b = serde_json::to_vec(&manifest).unwrap();
    let mh = sha256_hex(&manifest_b);
    fs::write(layout.join("blobs/sha256").join(&mh), &manifest_b).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{mh}"), "size": manifest_b.len(),
        "annotations": {"org.opencontainers.image.ref.name": "big"}}]});
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "helper_import_process",
                "--ignored",
                "--test-threads=1",
            ])
            .env(
                "NESTOR_IMAGE_TEST_CHILD",
                format!("{}\n{}", root.display(), layout.display()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Wait until its file is partly written, then SIGKILL it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let partial = loop {
        let staged: Vec<PathBuf> = fs::read_dir(root.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().path().join("diff/big"))
            .filter(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0))
            .collect();
        if let Some(p) = staged.into_iter().next() {
            break p;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("importer exited ({status}) before it could be killed mid-layer");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "importer never started writing the layer"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert!(!status.success());
    let written = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(
        written < size,
        "importer finished the layer before the kill ({written} bytes)"
    );

    // Nothing of it is taken as complete.
    let store = area.store();
    assert!(dir_entries(&root.join("layers")).is_empty());
    assert!(store.list().unwrap().is_empty());
    assert_eq!(
        store.get("big").unwrap_err().to_string(),
        "image 'big' not found"
    );
    // gc clears the staging leftovers; a new import works.
    assert!(!dir_entries(&root.join("tmp")).is_empty());
    assert!(store.gc().unwrap().staging_removed >= 1);
    assert!(dir_entries(&root.join("tmp")).is_empty());
    store.import(&sample_layout(), None, &mut quiet()).unwrap();
    assert!(store.get("busybox").is_ok());
}
