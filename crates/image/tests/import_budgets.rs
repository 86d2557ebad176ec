//! Regression tests for import budgets and sparse entries: hostile layers built here
//! (a gzip bomb made of concatenated gzip members of zeros, GNU sparse entries with and
//! without an extension block, an entry-count bomb, two layers that together go over
//! the per-import budget) must be refused while streaming, or stored with holes, with
//! one line naming the layer and the budget, little disk used and nothing left behind.
//! Small budgets are set through `ImageStore::with_limits` so the tests stay fast.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use nestor_image::{
    ImageError, ImageStore, ImportLimits, ENV_MAX_BYTES, ENV_MAX_LAYER_BYTES, ENV_MAX_LAYER_ENTRIES,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn limits(layer_bytes: u64, import_bytes: u64, layer_entries: u64) -> ImportLimits {
    ImportLimits {
        max_layer_bytes: layer_bytes,
        max_bytes: import_bytes,
        max_layer_entries: layer_entries,
        max_entries: 4 * layer_entries,
    }
}

/// An OCI layout at `dir` with one image whose layers are `(blob, media type, diff_id)`.
/// The diff_id is given, not computed, so a bomb need not be expanded to be described.
fn write_layout(dir: &Path, layers: &[(Vec<u8>, &str, String)]) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let put = |b: &[u8]| {
        let d = sha256(b);
        fs::write(
            dir.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
            b,
        )
        .unwrap();
        d
    };
    let diff_ids: Vec<&String> = layers.iter().map(|l| &l.2).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_b = serde_json::to_vec(&config).unwrap();
    let descs: Vec<_> = layers
        .iter()
        .map(|(b, mt, _)| serde_json::json!({"mediaType": mt, "digest": put(b), "size": b.len()}))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(&config_b), "size": config_b.len()},
        "layers": descs,
    });
    let manifest_b = serde_json::to_vec(&manifest).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": put(&manifest_b), "size": manifest_b.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "bomb:1"}}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A gzip stream of `head` followed by `zeros` zero bytes, as concatenated gzip members
/// (the decoder reads them as one stream): 16 MiB of zeros are compressed once and the
/// member repeated, so a 1 GiB stream costs about 1 MiB and no time to build.
fn gzip_then_zeros(head: &[u8], zeros: u64) -> Vec<u8> {
    const CHUNK: u64 = 16 * MIB;
    let mut out = gzip(head);
    let member = gzip(&vec![0u8; CHUNK as usize]);
    for _ in 0..zeros / CHUNK {
        out.extend_from_slice(&member);
    }
    out.extend_from_slice(&gzip(&vec![0u8; (zeros % CHUNK) as usize]));
    out
}

struct Area {
    dir: TempDir,
}

impl Area {
    fn new() -> Self {
        Area {
            dir: tempfile::Builder::new()
                .prefix("nestor-budget-test-")
                .tempdir()
                .unwrap(),
        }
    }
    fn layout(&self) -> std::path::PathBuf {
        self.dir.path().join("layout")
    }
    fn store(&self, l: ImportLimits) -> ImageStore {
        ImageStore::open(&self.dir.path().join("store"))
            .unwrap()
            .with_limits(l)
    }
    /// Blocks (512 bytes) allocated under the store.
    fn store_blocks(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let m = fs::symlink_metadata(p).unwrap();
            let mut n = m.blocks();
            if m.is_dir() {
                for e in fs::read_dir(p).unwrap() {
                    n += walk(&e.unwrap().path());
                }
            }
            n
        }
        walk(&self.dir.path().join("store"))
    }
    /// Nothing of a refused import stays: no layer, record, blob or staging.
    fn assert_clean(&self) {
        for d in ["layers", "images", "tmp", "blobs/sha256"] {
            let p = self.dir.path().join("store").join(d);
            let left: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert!(left.is_empty(), "leftovers in {}: {left:?}", p.display());
        }
        let kib = self.store_blocks() / 2;
        assert!(kib < 1024, "the store holds {kib} KiB after a refusal");
    }
}

/// Imports and expects a budget refusal naming `diff_id` and `setting`.
fn expect_budget(area: &Area, l: ImportLimits, diff_id: &str, setting: &str) -> String {
    let t = std::time::Instant::now();
    let err = area
        .store(l)
        .import(&area.layout(), None, &mut |_| {})
        .expect_err("the hostile import was accepted");
    let msg = err.to_string();
    eprintln!("refused in {:?}: {msg}", t.elapsed());
    assert!(
        matches!(&err, ImageError::BudgetExceeded { setting: s, .. } if *s == setting),
        "not a {setting} refusal: {msg}"
    );
    assert!(msg.contains(diff_id), "does not name the layer: {msg}");
    assert!(msg.contains(setting), "does not name the budget: {msg}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    area.assert_clean();
    msg
}

#[test]
fn gzip_bomb_is_refused_while_streaming() {
    let l = limits(64 * MIB, 256 * MIB, 1000);
    let fake_diff = sha256(b"never computed");

    // One 1 GiB entry (a 1 MiB blob): its header size alone is over the budget.
    let area = Area::new();
    let mut head = header("zero.bin", tar::EntryType::Regular, 1 << 30)
        .as_bytes()
        .to_vec();
    head.truncate(512);
    let blob = gzip_then_zeros(&head, (1 << 30) + 1024);
    assert!(blob.len() < 2 << 20, "bomb is {} bytes", blob.len());
    write_layout(&area.layout(), &[(blob, GZIP, fake_diff.clone())]);
    let msg = expect_budget(&area, l, &fake_diff, ENV_MAX_LAYER_BYTES);
    assert!(msg.contains("zero.bin"), "{msg}");

    // 32 entries of 32 MiB: each header fits, the stream does not, and is cut at 64 MiB.
    let area = Area::new();
    let mut plain_head = Vec::new();
    let mut blob = Vec::new();
    for i in 0..32 {
        plain_head.clear();
        plain_head.extend_from_slice(
            header(&format!("z{i}"), tar::EntryType::Regular, 32 * MIB).as_bytes(),
        );
        if i == 0 {
            blob = gzip_then_zeros(&plain_head, 32 * MIB);
        } else {
            blob.extend(gzip_then_zeros(&plain_head, 32 * MIB));
        }
    }
    blob.extend(gzip(&[0u8; 1024]));
    write_layout(&area.layout(), &[(blob, GZIP, fake_diff.clone())]);
    let msg = expect_budget(&area, l, &fake_diff, ENV_MAX_LAYER_BYTES);
    assert!(msg.contains("decompressed"), "{msg}");

    // A tiny tar, then 1 GiB of zeros after its end: the stream still counts.
    let area = Area::new();
    let mut tiny = tar::Builder::new(Vec::new());
    let h = header("a", tar::EntryType::Regular, 1);
    tiny.append(&h, &b"x"[..]).unwrap();
    let blob = gzip_then_zeros(&tiny.into_inner().unwrap(), 1 << 30);
    write_layout(&area.layout(), &[(blob, GZIP, fake_diff.clone())]);
    let msg = expect_budget(&area, l, &fake_diff, ENV_MAX_LAYER_BYTES);
    assert!(msg.contains("decompressed"), "{msg}");
}

fn octal(field: &mut [u8; 12], v: u64) {
    let s = format!("{v:011o}");
    assert_eq!(s.len(), 11);
    field[..11].copy_from_slice(s.as_bytes());
    field[11] = 0;
}

/// A layer with one GNU sparse entry `sparse.bin` of apparent size `real`, whose data
/// segments are `(offset, bytes)`; past four segments they go in extension blocks. As
/// GNU tar does, an empty segment at `real` ends the map when the file ends in a hole.
fn sparse_tar(real: u64, segments: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut segments = segments.to_vec();
    if segments
        .last()
        .is_some_and(|(o, d)| o + d.len() as u64 != real)
    {
        segments.push((real, Vec::new()));
    }
    let segments = &segments[..];
    let stored: u64 = segments.iter().map(|s| s.1.len() as u64).sum();
    let mut h = header("sparse.bin", tar::EntryType::GNUSparse, stored);
    let ext: Vec<&[(u64, Vec<u8>)]> = segments.get(4..).unwrap_or(&[]).chunks(21).collect();
    {
        let g = h.as_gnu_mut().unwrap();
        octal(&mut g.realsize, real);
        for (slot, (off, data)) in g.sparse.iter_mut().zip(segments) {
            octal(&mut slot.offset, *off);
            octal(&mut slot.numbytes, data.len() as u64);
        }
        g.isextended[0] = u8::from(!ext.is_empty());
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    for (i, chunk) in ext.iter().enumerate() {
        let mut block = [0u8; 512];
        for (j, (off, data)) in chunk.iter().enumerate() {
            let mut o = [0u8; 12];
            let mut n = [0u8; 12];
            octal(&mut o, *off);
            octal(&mut n, data.len() as u64);
            block[j * 24..j * 24 + 12].copy_from_slice(&o);
            block[j * 24 + 12..j * 24 + 24].copy_from_slice(&n);
        }
        block[504] = u8::from(i + 1 < ext.len());
        out.extend_from_slice(&block);
    }
    for (_, data) in segments {
        out.extend_from_slice(data);
    }
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

#[test]
fn sparse_entries_are_stored_with_holes() {
    let gib = 1u64 << 30;
    // Four segments (all in the header), then ten (six in an extension block).
    for n in [4u64, 10] {
        let area = Area::new();
        let segs: Vec<(u64, Vec<u8>)> = (0..n)
            .map(|i| (i * (gib / n) / 4096 * 4096, vec![b'A' + i as u8; 1024]))
            .collect();
        let tar = sparse_tar(gib, &segs);
        assert!(tar.len() < 20 << 10, "sparse tar is {} bytes", tar.len());
        write_layout(&area.layout(), &[(tar.clone(), TAR, sha256(&tar))]);
        let store = area.store(ImportLimits::default());
        store
            .import(&area.layout(), None, &mut |_| {})
            .expect("sparse layer refused");
        let img = store.get("bomb:1").unwrap();
        let f = img.layers[0].join("sparse.bin");
        let m = fs::metadata(&f).unwrap();
        assert_eq!(m.len(), gib, "apparent size");
        assert!(
            m.blocks() * 512 < 4 * MIB,
            "{n} segments: {} bytes allocated for a sparse file",
            m.blocks() * 512
        );
        let file = fs::File::open(&f).unwrap();
        for (off, data) in &segs {
            let mut got = vec![0u8; data.len() + 16];
            file.read_exact_at(&mut got, *off).unwrap();
            assert_eq!(&got[..data.len()], &data[..], "segment at {off}");
            assert!(got[data.len()..].iter().all(|&b| b == 0), "after {off}");
        }
        let mut last = [1u8; 8];
        file.read_exact_at(&mut last, gib - 8).unwrap();
        assert_eq!(last, [0; 8]);
        assert!(
            area.store_blocks() * 512 < 4 * MIB,
            "store uses too much disk"
        );
    }

    // Apparent size over the budget: refused at once, nothing written.
    let area = Area::new();
    let tar = sparse_tar(4 << 30, &[((4 << 30) - 512, vec![1u8; 512])]);
    let diff = sha256(&tar);
    write_layout(&area.layout(), &[(tar, TAR, diff.clone())]);
    let msg = expect_budget(
        &area,
        limits(64 * MIB, 256 * MIB, 1000),
        &diff,
        ENV_MAX_LAYER_BYTES,
    );
    assert!(
        msg.contains("sparse.bin") && msg.contains("extracted"),
        "{msg}"
    );
}

/// A gzip layer holding one `size`-byte file named `name` (patterned, not zeros), and
/// its diff_id.
fn file_layer(name: &str, size: usize) -> (Vec<u8>, String) {
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &header(name, tar::EntryType::Regular, size as u64),
        &data[..],
    )
    .unwrap();
    let plain = b.into_inner().unwrap();
    (gzip(&plain), sha256(&plain))
}

#[test]
fn per_import_budget_spans_layers() {
    let (a, da) = file_layer("a.bin", 6 * MIB as usize);
    let (b, db) = file_layer("b.bin", 6 * MIB as usize);
    let layers = [(a, GZIP, da.clone()), (b, GZIP, db.clone())];

    // Within budgets the image imports (the layout is valid).
    let ok = Area::new();
    write_layout(&ok.layout(), &layers);
    ok.store(limits(8 * MIB, 16 * MIB, 1000))
        .import(&ok.layout(), None, &mut |_| {})
        .expect("valid two-layer image refused");

    // Each layer fits 8 MiB, both do not fit 10 MiB: the second is refused, and the
    // first, added by this import, is removed again.
    let area = Area::new();
    write_layout(&area.layout(), &layers);
    let msg = expect_budget(&area, limits(8 * MIB, 10 * MIB, 1000), &db, ENV_MAX_BYTES);
    assert!(msg.contains("per-import"), "{msg}");
    assert!(!msg.contains(&da), "{msg}");
}

#[test]
fn entry_count_bomb_is_refused() {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..5000 {
        b.append(
            &header(&format!("f{i}"), tar::EntryType::Regular, 0),
            &b""[..],
        )
        .unwrap();
    }
    let plain = b.into_inner().unwrap();
    let diff = sha256(&plain);
    let area = Area::new();
    write_layout(&area.layout(), &[(gzip(&plain), GZIP, diff.clone())]);
    let msg = expect_budget(
        &area,
        limits(64 * MIB, 256 * MIB, 1000),
        &diff,
        ENV_MAX_LAYER_ENTRIES,
    );
    assert!(msg.contains("1000 entries"), "{msg}");

    // The same layer within a larger count imports.
    let ok = Area::new();
    write_layout(&ok.layout(), &[(gzip(&plain), GZIP, diff)]);
    ok.store(limits(64 * MIB, 256 * MIB, 10_000))
        .import(&ok.layout(), None, &mut |_| {})
        .expect("5000 entries under a 10000 budget refused");
}

#[test]
fn limits_come_from_the_environment() {
    // No other test in this binary reads the environment (they all set limits).
    std::env::set_var(ENV_MAX_LAYER_BYTES, "64M");
    std::env::set_var(ENV_MAX_LAYER_ENTRIES, "500");
    let l = ImportLimits::from_env().unwrap();
    assert_eq!(l.max_layer_bytes, 64 * MIB);
    assert_eq!(l.max_layer_entries, 500);
    assert_eq!(l.max_bytes, ImportLimits::default().max_bytes);
    std::env::set_var(ENV_MAX_LAYER_ENTRIES, "lots");
    let err = ImportLimits::from_env().unwrap_err().to_string();
    assert!(
        err.contains(ENV_MAX_LAYER_ENTRIES) && err.contains("lots"),
        "{err}"
    );
    std::env::remove_var(ENV_MAX_LAYER_BYTES);
    std::env::remove_var(ENV_MAX_LAYER_ENTRIES);
}

/// A docker-archive (`manifest.json`, config, `layer.tar`) holding `layer` as its one layer.
fn docker_archive(layer: &[u8]) -> Vec<u8> {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
    });
    let config_b = serde_json::to_vec(&config).unwrap();
    let cfg_name = format!("{}.json", sha256(&config_b).trim_start_matches("sha256:"));
    let manifest = serde_json::json!([{"Config": cfg_name, "RepoTags": ["bomb:1"],
                                       "Layers": ["l/layer.tar"]}]);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        (cfg_name.as_str(), &config_b[..]),
        ("l/layer.tar", layer),
        ("manifest.json", &serde_json::to_vec(&manifest).unwrap()[..]),
    ] {
        b.append(
            &header(name, tar::EntryType::Regular, data.len() as u64),
            data,
        )
        .unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn small_docker_archive_with_sparse_entry_stays_small() {
    let gib = 1u64 << 30;
    let layer = sparse_tar(gib, &[(0, vec![7u8; 512]), (gib / 2, vec![9u8; 512])]);
    let archive = docker_archive(&layer);
    assert!(
        archive.len() < 16 << 10,
        "archive is {} bytes",
        archive.len()
    );
    let area = Area::new();
    let path = area.dir.path().join("sparse-docker.tar");
    fs::write(&path, &archive).unwrap();
    let store = area.store(ImportLimits::default());
    store.import(&path, None, &mut |_| {}).expect("refused");
    let f = store.get("bomb:1").unwrap().layers[0].join("sparse.bin");
    let m = fs::metadata(&f).unwrap();
    assert_eq!(m.len(), gib);
    assert!(
        m.blocks() * 512 < MIB,
        "{} bytes allocated",
        m.blocks() * 512
    );
    assert!(area.store_blocks() * 512 < 4 * MIB);
}

#[test]
fn compressed_archive_is_decompressed_within_the_import_budget() {
    // A gzip'd archive that expands to 1 GiB of zeros after a tiny tar.
    let area = Area::new();
    let path = area.dir.path().join("bomb.tar.gz");
    fs::write(&path, gzip_then_zeros(&docker_archive(b""), 1 << 30)).unwrap();
    let err = area
        .store(limits(64 * MIB, 64 * MIB, 1000))
        .import(&path, None, &mut |_| {})
        .expect_err("the archive bomb was accepted");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(
        matches!(&err, ImageError::BudgetExceeded { setting, .. } if *setting == ENV_MAX_BYTES),
        "{msg}"
    );
    assert!(
        msg.contains("bomb.tar.gz") && msg.contains("decompressed"),
        "{msg}"
    );
    area.assert_clean();
}
