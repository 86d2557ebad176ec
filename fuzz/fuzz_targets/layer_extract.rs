//! Layer extraction on a structured tarball: entries of every kind (files, directories,
//! symlinks, hard links, devices, FIFOs, whiteouts, PAX xattrs), with names built from a
//! small alphabet of components (`..`, `/`, `.wh.`, symlinked parents) so the fuzzer
//! reaches the refusals. After each extraction an invariant checker walks the layer:
//! nothing exists outside it (the sibling canary directory is untouched and nothing new
//! appeared next to the layer), and the only device node is a 0:0 character device.
#![no_main]

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Part {
    A,
    B,
    Dot,
    DotDot,
    Empty,
    Wh,
    Opq,
    Canary,
    Etc,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<Part>, bool),
    Hardlink(Vec<Part>, bool),
    Char(u8, u8),
    Block(u8, u8),
    Fifo,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    absolute: bool,
    path: Vec<Part>,
    kind: Kind,
    mode: u16,
    xattr: Option<(bool, Vec<u8>)>,
    size_delta: i8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    entries: Vec<Entry>,
    trailing_garbage: Vec<u8>,
    truncate: Option<u16>,
}

fn name(parts: &[Part], absolute: bool) -> String {
    let mut s = String::from(if absolute { "/" } else { "" });
    for (i, p) in parts.iter().take(6).enumerate() {
        if i > 0 {
            s.push('/');
        }
        s.push_str(match p {
            Part::A => "a",
            Part::B => "b",
            Part::Dot => ".",
            Part::DotDot => "..",
            Part::Empty => "",
            Part::Wh => ".wh.a",
            Part::Opq => ".wh..wh..opq",
            Part::Canary => "../canary/x",
            Part::Etc => "/etc",
        });
    }
    if s.is_empty() {
        s.push('a');
    }
    s
}

fn pax(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> <key>=<value>\n" where len counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn tarball(input: &Input) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in input.entries.iter().take(64) {
        if let Some((trusted, v)) = &e.xattr {
            let key = if *trusted {
                "SCHILY.xattr.trusted.overlay.opaque"
            } else {
                "SCHILY.xattr.user.x"
            };
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            let data = pax(key, v);
            h.set_size(data.len() as u64);
            h.set_cksum();
            let _ = b.append(&h, &data[..]);
        }
        let mut h = tar::Header::new_gnu();
        let path = name(&e.path, e.absolute);
        h.set_mode(u32::from(e.mode) & 0o7777);
        let mut data: &[u8] = &[];
        match &e.kind {
            Kind::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                data = d;
            }
            Kind::Dir => h.set_entry_type(tar::EntryType::Directory),
            Kind::Symlink(t, abs) => {
                h.set_entry_type(tar::EntryType::Symlink);
                let _ = h.set_link_name(name(t, *abs));
            }
            Kind::Hardlink(t, abs) => {
                h.set_entry_type(tar::EntryType::Link);
                let _ = h.set_link_name(name(t, *abs));
            }
            Kind::Char(ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                let _ = h.set_device_major(u32::from(*ma % 3));
                let _ = h.set_device_minor(u32::from(*mi % 3));
            }
            Kind::Block(ma, mi) => {
                h.set_entry_type(tar::EntryType::Block);
                let _ = h.set_device_major(u32::from(*ma % 3));
                let _ = h.set_device_minor(u32::from(*mi % 3));
            }
            Kind::Fifo => h.set_entry_type(tar::EntryType::Fifo),
        }
        let size = (data.len() as i64 + i64::from(e.size_delta)).max(0) as u64;
        h.set_size(if matches!(e.kind, Kind::File(_)) {
            size
        } else {
            0
        });
        // Names the header cannot hold are written raw, as a hostile tool might.
        if h.set_path(&path).is_err() {
            let raw = &mut h.as_old_mut().name;
            let n = path.len().min(raw.len());
            raw[..n].copy_from_slice(&path.as_bytes()[..n]);
        }
        h.set_cksum();
        let mut padded = data.to_vec();
        padded.resize(size as usize, 0);
        let _ = b.append(&h, &padded[..]);
    }
    let mut out = b.into_inner().unwrap_or_default();
    out.extend_from_slice(&input.trailing_garbage);
    if let Some(t) = input.truncate {
        out.truncate(usize::from(t));
    }
    out
}

/// Every device node under `dir` is a 0:0 character device (a whiteout).
fn check_tree(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let ft = m.file_type();
        assert!(!ft.is_block_device(), "block device {:?}", e.path());
        if ft.is_char_device() {
            assert_eq!(m.rdev(), 0, "device node {:?} is not 0:0", e.path());
        }
        if ft.is_dir() {
            check_tree(&e.path());
        }
    }
}

fuzz_target!(|input: Input| {
    let tar = tarball(&input);
    let top = tempfile::tempdir().unwrap();
    let layer = top.path().join("layer");
    let canary = top.path().join("canary");
    std::fs::create_dir(&layer).unwrap();
    std::fs::create_dir(&canary).unwrap();
    let _ = nestor_image::fuzzing::extract_layer_with_budgets(&tar, &layer, 1 << 20, 256);
    check_tree(&layer);
    let canary_entries = std::fs::read_dir(&canary).unwrap().count();
    assert_eq!(
        canary_entries, 0,
        "an entry landed outside the layer (canary)"
    );
    let mut siblings: Vec<_> = std::fs::read_dir(top.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    siblings.sort();
    assert_eq!(
        siblings,
        ["canary", "layer"],
        "an entry landed next to the layer"
    );
    // /etc is never written: the host's would be, with an absolute symlink followed.
    assert!(!Path::new("/etc/a").exists() && !Path::new("/etc/b").exists());
});
