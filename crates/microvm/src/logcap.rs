//! Size caps on the files a guest decides the growth of: the console file (serial
//! output) and the VMM's stderr (warnings and traces, when stderr is a regular file).
//! A [`CappedFile`] keeps the newest bytes: when the file would pass its limit it is
//! truncated and rewritten with a one-line marker and the last half of the limit
//! (kept in memory), so the end of the file, which failure reports read, is always the
//! latest output. Pipes, terminals and other non-regular files pass through untouched.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::sync::Mutex;

/// Default limit of the console file and of stderr, in bytes.
pub const DEFAULT_LOG_LIMIT: u64 = 1 << 20;
/// Smallest accepted limit (0 means no limit).
pub const MIN_LOG_LIMIT: u64 = 4096;
/// Room left for the marker line within the limit.
const MARKER_ROOM: u64 = 128;

/// A file that never grows past its limit, keeping its newest bytes.
pub struct CappedFile {
    file: File,
    limit: u64,
    regular: bool,
    len: u64,
    tail: VecDeque<u8>,
    dropped: u64,
}

impl CappedFile {
    /// Wraps `file` (positioned at its end, or opened for appending) with `limit`
    /// bytes (0: no limit).
    pub fn new(file: File, limit: u64) -> Self {
        let (regular, len) = match file.metadata() {
            Ok(m) if m.file_type().is_file() => (true, m.len()),
            _ => (false, 0),
        };
        CappedFile {
            file,
            limit,
            regular,
            len,
            tail: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Changes the limit (0: no limit).
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    fn keep(&self) -> usize {
        (self.limit / 2).saturating_sub(MARKER_ROOM) as usize
    }

    fn remember(&mut self, buf: &[u8]) {
        let keep = self.keep();
        let buf = &buf[buf.len().saturating_sub(keep)..];
        let excess = (self.tail.len() + buf.len()).saturating_sub(keep);
        self.tail.drain(..excess.min(self.tail.len()));
        self.tail.extend(buf);
    }

    /// Truncates the file and writes the marker and the kept tail (which already holds
    /// the write that did not fit).
    fn compact(&mut self, incoming: usize) -> std::io::Result<()> {
        self.dropped += (self.len + incoming as u64).saturating_sub(self.tail.len() as u64);
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        let marker = format!(
            "[nestor-vmm: {} earlier bytes dropped (limit {} bytes)]\n",
            self.dropped, self.limit
        );
        self.file.write_all(marker.as_bytes())?;
        let (a, b) = self.tail.as_slices();
        self.file.write_all(a)?;
        self.file.write_all(b)?;
        self.len = (marker.len() + self.tail.len()) as u64;
        Ok(())
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.limit == 0 || !self.regular {
            return self.file.write(buf);
        }
        self.remember(buf);
        if self.len + buf.len() as u64 <= self.limit {
            self.file.write_all(buf)?;
            self.len += buf.len() as u64;
        } else {
            self.compact(buf.len())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

static STDERR: Mutex<Option<CappedFile>> = Mutex::new(None);

/// Routes [`StderrWriter`] through a capped copy of fd 2 with `limit` bytes (call it
/// again to change the limit). Without it, the writer writes to stderr directly.
pub fn cap_stderr(limit: u64) -> std::io::Result<()> {
    let mut g = STDERR.lock().unwrap_or_else(|p| p.into_inner());
    match g.as_mut() {
        Some(c) => c.set_limit(limit),
        None => {
            let fd = std::io::stderr().as_fd().try_clone_to_owned()?;
            *g = Some(CappedFile::new(File::from(fd), limit));
        }
    }
    Ok(())
}

/// Writes to the VMM's stderr through the cap of [`cap_stderr`] (the tracing writer).
#[derive(Clone, Copy, Debug, Default)]
pub struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = STDERR.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(c) => c.write(buf),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes one line to stderr through the cap (for the VMM's own messages).
pub fn eprint_line(line: &str) {
    let mut w = StderrWriter;
    let _ = w.write_all(format!("{line}\n").as_bytes());
}

/// `eprintln!` through the cap: the VMM's own lines share stderr's offset with the
/// capped tracing writer, so a line written around the cap could land in the middle of
/// a compaction (between its truncation and its rewind), leaving a hole of NULs.
#[macro_export]
macro_rules! eprintln_capped {
    ($($arg:tt)*) => {
        $crate::logcap::eprint_line(&format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_stays_under_the_limit_and_keeps_the_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        let mut c = CappedFile::new(f, 8192);
        let mut last = Vec::new();
        for i in 0..20_000u32 {
            last = format!("line {i}\n").into_bytes();
            c.write_all(&last).unwrap();
            let size = std::fs::metadata(&p).unwrap().len();
            assert!(size <= 8192, "{size} bytes after line {i}");
        }
        let text = std::fs::read(&p).unwrap();
        assert!(text.ends_with(&last));
        let s = String::from_utf8(text).unwrap();
        assert!(s.starts_with("[nestor-vmm: "), "{}", &s[..80]);
        assert!(s.contains("earlier bytes dropped (limit 8192 bytes)"));
        // The kept tail is contiguous: the lines after the marker count up by one.
        let nums: Vec<u32> = s
            .lines()
            .skip(2)
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(nums.len() > 300, "{} lines kept", nums.len());
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(*nums.last().unwrap(), 19_999);
    }

    #[test]
    fn a_write_larger_than_the_limit_keeps_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        // Not opened for appending: the offset is moved back on compaction.
        let f = std::fs::File::create(&p).unwrap();
        let mut c = CappedFile::new(f, 4096);
        let big: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        c.write_all(&big).unwrap();
        c.write_all(b"end\n").unwrap();
        let text = std::fs::read(&p).unwrap();
        assert!(text.len() <= 4096, "{}", text.len());
        assert!(text.ends_with(b"end\n"));
        let body = &text[text.iter().position(|&b| b == b'\n').unwrap() + 1..];
        assert!(big.ends_with(&body[..body.len() - 4]));
    }

    #[test]
    fn no_limit_and_pipes_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut c = CappedFile::new(std::fs::File::create(&p).unwrap(), 0);
        for _ in 0..100 {
            c.write_all(&[b'x'; 1000]).unwrap();
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 100_000);
        let (r, w) = std::io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut r = r;
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut v).unwrap();
            v.len()
        });
        let mut c = CappedFile::new(File::from(std::os::fd::OwnedFd::from(w)), 4096);
        for _ in 0..10 {
            c.write_all(&[b'y'; 1000]).unwrap();
        }
        drop(c);
        assert_eq!(reader.join().unwrap(), 10_000);
    }
}
