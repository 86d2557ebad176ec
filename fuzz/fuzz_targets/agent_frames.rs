//! The agent protocol's framing and messages as both ends decode them: the input's first
//! bytes choose the sizes of successive reads, the rest is the byte stream (the seeds are
//! real frames), which goes through `read_frame_bytes` (as the host and the client tools
//! read), and each frame is decoded as a request envelope (what the
//! agent does) and as a reply (what the host does). Invariants: no panic, no frame over
//! the limit, and a message that decodes re-encodes to bytes that decode to the same
//! message and encode to the same bytes.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use nestor_agent_protocol::{encode, read_frame_bytes, Envelope, Reply, MAX_FRAME};

struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    i: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = self
            .sizes
            .get(self.i % self.sizes.len().max(1))
            .map_or(buf.len(), |&s| usize::from(s).max(1));
        self.i += 1;
        let n = want.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn roundtrip<T>(msg: &T)
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let Ok(bytes) = encode(msg) else { return };
    let again: T = serde_json::from_slice(&bytes[4..]).expect("an encoded message decodes");
    let bytes2 = encode(&again).expect("a decoded message encodes");
    assert_eq!(bytes, bytes2, "re-encoding changed the bytes");
    assert_eq!(&again, msg);
}

fuzz_target!(|data: &[u8]| {
    let (sizes, stream) = data.split_at(data.len().min(4));
    let mut r = Chunked {
        data: stream,
        sizes,
        i: 0,
    };
    while let Ok(Some(frame)) = read_frame_bytes(&mut r) {
        assert!(frame.len() <= MAX_FRAME);
        if let Ok(env) = serde_json::from_slice::<Envelope>(&frame) {
            roundtrip(&env);
        }
        if let Ok(reply) = serde_json::from_slice::<Reply>(&frame) {
            roundtrip(&reply);
        }
    }
});
