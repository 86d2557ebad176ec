//! zstd streams of any number of frames: each frame is decoded in turn and skippable
//! frames are passed over. zstd:chunked layers (podman's partial pulls) are many frames
//! with skippable ones holding their table of contents, and `zstd` concatenates frames
//! when given several inputs; ruzstd's `StreamingDecoder` reads one frame only.

use std::io::{self, BufRead, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// Whether `magic` (the first four bytes of a stream) starts a zstd frame or a
/// skippable frame.
pub(crate) fn is_zstd(magic: &[u8]) -> bool {
    matches!(magic, [0x28, 0xb5, 0x2f, 0xfd, ..])
        || matches!(magic, [m, 0x2a, 0x4d, 0x18, ..] if m & 0xf0 == 0x50)
}

/// A reader of the decompressed bytes of every frame of `src`.
pub(crate) struct Frames<R: BufRead> {
    src: R,
    dec: FrameDecoder,
    /// A frame is being decoded (its header was read).
    in_frame: bool,
}

impl<R: BufRead> Frames<R> {
    pub(crate) fn new(src: R) -> Self {
        Frames {
            src,
            dec: FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.dec.can_collect() < buf.len() && !self.dec.is_finished() {
                    let more = buf.len() - self.dec.can_collect();
                    self.dec
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBytes(more))
                        .map_err(io::Error::other)?;
                }
                let n = self.dec.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                self.in_frame = false;
            }
            // The next frame, if the stream goes on.
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.init(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped =
                        io::copy(&mut (&mut self.src).take(length.into()), &mut io::sink())?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "zstd: a skippable frame is cut short",
                        ));
                    }
                }
                Err(e) => return Err(io::Error::other(format!("bad zstd data: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn decode(stream: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Frames::new(stream).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn frames_in_turn_and_skippable_ones_passed_over() {
        let (a, b): (Vec<u8>, Vec<u8>) = (
            (0..200_000u32).map(|i| (i % 251) as u8).collect(),
            b"second frame".repeat(1000),
        );
        let mut stream = compress(&a);
        // A skippable frame (magic 0x184D2A5E, 5 bytes of payload) between the two.
        stream.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 5, 0, 0, 0, 1, 2, 3, 4, 5]);
        stream.extend_from_slice(&compress(&b));
        assert!(is_zstd(&stream));
        let mut want = a.clone();
        want.extend_from_slice(&b);
        assert_eq!(decode(&stream).unwrap(), want);
        // A stream that starts with a skippable frame.
        let mut skip_first = vec![0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 9, 9];
        skip_first.extend_from_slice(&compress(&b));
        assert!(is_zstd(&skip_first));
        assert_eq!(decode(&skip_first).unwrap(), b);
    }

    #[test]
    fn bad_and_cut_streams_are_errors() {
        let good = compress(&b"some data".repeat(100));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"not zstd");
        assert!(decode(&trailing).is_err());
        assert!(decode(&good[..good.len() - 3]).is_err());
        let cut_skip = [0x50, 0x2a, 0x4d, 0x18, 100, 0, 0, 0, 1];
        assert!(decode(&cut_skip).is_err());
        assert!(!is_zstd(b"\x1f\x8b\x08\x00"));
    }
}
