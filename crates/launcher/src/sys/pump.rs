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
