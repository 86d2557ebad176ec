//! Byte pumps between stdio and streams (a thread per direction).

use std::io::{Read, Write};

/// Copies `from` into `to` until EOF; then closes `to`'s write side if it is a socket.
pub fn pump<R: Read + Send + 'static, W: Write + Send + 'static>(
    mut from: R,
    mut to: W,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = to.flush();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// How long [`pump_resumable`] tries to get a stream back without a byte of progress.
pub const RESUME_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a durable stream's pump records how many bytes it copied: a slot of 8 bytes
/// (little-endian) in a file shared by a container's pumps, rewritten after each copy.
/// A checkpoint reads it to know where the copy stands (`vm::checkpoint`).
#[derive(Clone)]
pub struct Counter {
    pub file: std::sync::Arc<std::fs::File>,
    pub slot: u64,
}

impl Counter {
    fn record(&self, offset: u64) {
        use std::os::unix::fs::FileExt;
        let _ = self.file.write_all_at(&offset.to_le_bytes(), self.slot * 8);
    }
}

/// Copies a durable stream (the agent's relayed output, which outlives a connection)
/// into `to` until the stream's end, starting at byte `start` of the stream (what an
/// earlier copy took; 0 for a new one). When a connection ends (or with `first` None,
/// at once), `reattach(offset)` asks for a new one from the byte count copied so far;
/// it answers the connection, the bytes the stream had carried then and whether it had
/// ended, or `None` when the agent refuses for good. The copy is over when the stream
/// ended and every byte of it was copied, when the agent refuses, or when no
/// connection brings a byte for [`RESUME_PATIENCE`] (the VM is gone). `counter`, when
/// given, records the byte count after each write.
pub fn pump_resumable<W, F>(
    first: Option<std::os::unix::net::UnixStream>,
    start: u64,
    mut to: W,
    counter: Option<Counter>,
    mut reattach: F,
) -> std::thread::JoinHandle<()>
where
    W: Write + Send + 'static,
    F: FnMut(u64) -> anyhow::Result<Option<(std::os::unix::net::UnixStream, u64, bool)>>
        + Send
        + 'static,
{
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        let mut offset = start;
        let mut from = first;
        if let Some(c) = &counter {
            c.record(offset);
        }
        // Since when the stream is lost: a connection ended, and no byte came since.
        let mut lost: Option<std::time::Instant> = None;
        loop {
            if let Some(mut s) = from.take() {
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            offset += n as u64;
                            lost = None;
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            let _ = to.flush();
                            if let Some(c) = &counter {
                                c.record(offset);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
            // No byte since the last attempt: wait a little before the next (a guest
            // that answers with streams that end at once cannot make this spin).
            let stalled = lost.is_some();
            if lost.get_or_insert_with(std::time::Instant::now).elapsed() > RESUME_PATIENCE {
                tracing::warn!("a stream of the container was lost at byte {offset}");
                return;
            }
            if stalled {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            match reattach(offset) {
                Ok(None) => return,
                Ok(Some((_, total, true))) if total == offset => return,
                Ok(Some((s, _, _))) => from = Some(s),
                Err(e) => tracing::debug!("reattach at byte {offset}: {e:#}"),
            }
        }
    })
}

/// Joins the pumps `handles` until `limit` has passed, then lets the rest go (they end
/// with the process). Output still flowing after a container's exit gets this long; a
/// guest that keeps a stream open forever cannot hold nestor.
pub fn join_within(handles: Vec<std::thread::JoinHandle<()>>, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    for h in handles {
        while !h.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!(
                "a stream of the container stayed open {} s after its exit: left behind",
                limit.as_secs()
            );
            return;
        }
    }
}
