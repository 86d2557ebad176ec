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
