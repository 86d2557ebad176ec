//! Reading files a guest decides the content of (its console log, the VMM's stderr)
//! into nestor's own messages: only a bounded slice of the file is read, and control
//! characters (terminal escapes a guest could print) are shown as `?`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of a guest-written file nestor reads for one message.
const SLICE: u64 = 16 << 10;

/// Printable text: control characters but tab become `?`.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// The last `n` non-empty lines of `path`, from at most its last 16 KiB.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(SLICE))).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(SLICE).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| clean(l))
        .collect()
}

/// The first 16 KiB of `path`, as text (for a marker written early).
pub fn head(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(SLICE).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_read_from_its_end_only_and_escapes_are_shown_as_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut body = "x".repeat(4 << 20);
        body.push_str("\nlast but one\n\x1b[2Jlast\n");
        std::fs::write(&p, body).unwrap();
        assert_eq!(tail(&p, 2), ["last but one", "?[2Jlast"]);
        assert_eq!(head(&p).len(), SLICE as usize);
        assert!(tail(&d.path().join("missing"), 3).is_empty());
    }
}
