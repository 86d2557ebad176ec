//! sha256 digests: parsing `sha256:<hex>` strings, hashing byte slices, and a reader
//! that hashes (and counts) everything read through it, so a blob is verified in the
//! same pass that decompresses and extracts it.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::ImageError;

/// Returns the 64-character lowercase hex part of a `sha256:<hex>` digest, or an error
/// naming `what` if the digest is malformed or uses another algorithm.
pub(crate) fn sha256_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str, ImageError> {
    let Some((alg, hex)) = digest.split_once(':') else {
        return Err(ImageError::invalid(
            what,
            format!("'{digest}' is not a digest (expected sha256:<64 hex digits>)"),
        ));
    };
    if alg != "sha256" {
        return Err(ImageError::Unsupported(format!(
            "{what}: digest algorithm '{alg}' (only sha256 is supported)"
        )));
    }
    if !is_hex64(hex) {
        return Err(ImageError::invalid(
            what,
            format!("'{digest}' is not a valid sha256 digest"),
        ));
    }
    Ok(hex)
}

/// True for exactly 64 lowercase hex digits.
pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `sha256:<hex>` of a byte slice.
pub(crate) fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A short form for progress lines: `sha256:0123456789ab…`.
pub(crate) fn short(digest: &str) -> String {
    match digest.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}…", &hex[..12]),
        _ => digest.to_string(),
    }
}

/// Hashes and counts every byte read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads the rest of the stream (so the digest covers all of it) and returns
    /// (`sha256:<hex>`, total bytes).
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> HashingReader<R> {
    /// As [`HashingReader::finish`], giving the inner reader back too.
    pub(crate) fn finish_into(mut self) -> io::Result<(String, u64, R)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
            self.inner,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_digests() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(sha256_hex(&good, "x").unwrap(), "a".repeat(64));
        assert!(sha256_hex("sha256:abc", "x").is_err());
        assert!(sha256_hex(&format!("sha256:{}", "A".repeat(64)), "x").is_err());
        assert!(sha256_hex(&format!("sha256:../{}", "a".repeat(61)), "x").is_err());
        let e = sha256_hex(&format!("sha512:{}", "a".repeat(128)), "blob").unwrap_err();
        assert!(e.to_string().contains("sha512"), "{e}");
        assert!(sha256_hex("nocolon", "x").is_err());
    }

    #[test]
    fn hashing_reader_covers_unread_tail() {
        let data = b"hello world";
        let mut r = HashingReader::new(&data[..]);
        let mut first = [0u8; 5];
        r.read_exact(&mut first).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!(n, 11);
        assert_eq!(d, sha256_of(data));
    }
}
