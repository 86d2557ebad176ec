//! Durable output streams: a process's stdout or stderr goes to a pipe that a relay
//! thread copies to the host's current stdio connection, so the process outlives that
//! connection (a vsock transport reset, after a snapshot restore or a migration, breaks
//! every connection). The relay counts the bytes it has read and keeps the last
//! [`REPLAY_BYTES`] of them; a host that reattaches with the number of bytes it has
//! received gets the rest from there, so nothing is lost or repeated. While no
//! connection is attached, the relay reads no further: the process blocks on a full
//! pipe, as it would on a terminal nobody reads. The newest connection wins; an older
//! one still attached is closed.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{Context, Result};
use nestor_agent_protocol::REPLAY_BYTES;

/// How much the relay reads from the pipe at a time.
const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct State {
    /// The host's connection, if one is attached.
    sink: Option<OwnedFd>,
    /// Bumped by every reattach, so a write that failed on an older connection does not
    /// detach a newer one.
    generation: u64,
    /// The last bytes read (at most [`REPLAY_BYTES`]).
    ring: VecDeque<u8>,
    /// Every byte read from the pipe.
    total: u64,
    /// The process's side is closed: nothing more will come.
    eof: bool,
}

/// One durable stream (see the module docs).
pub struct Relay {
    state: Mutex<State>,
    attached: Condvar,
}

/// Sends all of `bytes` on socket `fd` (no SIGPIPE on a closed peer).
fn send_all(fd: &OwnedFd, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: sending from a live buffer on a valid descriptor.
        let r = unsafe {
            libc::send(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[r as usize..];
    }
    Ok(())
}

/// Ends the host's copy of the stream (EOF), whoever else holds the socket.
fn end(fd: &OwnedFd) {
    // SAFETY: shutdown on a valid descriptor.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

impl Relay {
    /// Starts relaying to `sink` (a stdio connection, made blocking here): the relay,
    /// and the pipe's write end to give the process.
    pub fn start(sink: OwnedFd) -> Result<(Arc<Relay>, OwnedFd)> {
        crate::stdio::set_blocking(&sink)?;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
        let relay = Arc::new(Relay {
            state: Mutex::new(State {
                sink: Some(sink),
                ..State::default()
            }),
            attached: Condvar::new(),
        });
        let me = relay.clone();
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || me.run(std::fs::File::from(r)))
            .context("start the relay thread")?;
        Ok((relay, w))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, mut pipe: std::fs::File) {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("relay: read the process's stream: {e}");
                    0
                }
            };
            let mut st = self.lock();
            if n == 0 {
                st.eof = true;
                if let Some(s) = st.sink.take() {
                    end(&s);
                }
                return;
            }
            st.ring.extend(&buf[..n]);
            let extra = st.ring.len().saturating_sub(REPLAY_BYTES);
            st.ring.drain(..extra);
            st.total += n as u64;
            // Written outside the lock (a reattach must not wait for a slow reader) on a
            // copy of the descriptor, once a connection is there; unless a reattach came
            // first, whose replay carried this chunk already.
            let appended_at = st.generation;
            let sink = loop {
                if st.generation != appended_at {
                    break None;
                }
                if let Some(s) = &st.sink {
                    match s.try_clone() {
                        Ok(c) => break Some(c),
                        Err(_) => st.sink = None,
                    }
                }
                st = self.attached.wait(st).unwrap_or_else(|e| e.into_inner());
            };
            drop(st);
            let Some(sink) = sink else { continue };
            if send_all(&sink, &buf[..n]).is_err() {
                let mut st = self.lock();
                if st.generation == appended_at {
                    st.sink = None;
                }
            }
        }
    }

    /// Whether a reattach at `offset` can be served (the bytes from there on are kept):
    /// then the bytes carried so far, and whether the process's side is closed.
    pub fn check(&self, offset: u64) -> std::result::Result<(u64, bool), String> {
        let st = self.lock();
        match st.total.checked_sub(offset) {
            None => Err(format!(
                "offset {offset} is past the {} bytes the stream has carried",
                st.total
            )),
            Some(back) if back > st.ring.len() as u64 => Err(format!(
                "offset {offset} is {back} bytes back; only the last {} are kept",
                st.ring.len()
            )),
            Some(_) => Ok((st.total, st.eof)),
        }
    }

    /// Makes `sink` (a stdio connection whose reply was sent) the stream's connection
    /// from `offset` on, in a thread of its own (sending what is replayed can block). An
    /// offset that can no longer be served closes the connection at once.
    pub fn reattach(self: &Arc<Self>, sink: OwnedFd, offset: u64) {
        let me = self.clone();
        let r = std::thread::Builder::new()
            .name("reattach".into())
            .spawn(move || me.take_over(sink, offset));
        if let Err(e) = r {
            tracing::warn!("relay: reattach thread: {e}");
        }
    }

    fn take_over(&self, sink: OwnedFd, offset: u64) {
        if let Err(e) = crate::stdio::set_blocking(&sink) {
            tracing::warn!("relay: {e:#}");
            return;
        }
        // Held while the replay is sent: the relay reads on meanwhile, but cannot add to
        // the ring or pick a connection until this one is in place.
        let mut st = self.lock();
        let Some(back) = st
            .total
            .checked_sub(offset)
            .filter(|b| *b <= st.ring.len() as u64)
        else {
            return;
        };
        let from = st.ring.len() - back as usize;
        let replay: Vec<u8> = st.ring.range(from..).copied().collect();
        if send_all(&sink, &replay).is_err() {
            return;
        }
        st.generation += 1;
        if let Some(old) = st.sink.take() {
            end(&old);
        }
        if st.eof {
            end(&sink);
            return;
        }
        st.sink = Some(sink);
        self.attached.notify_all();
    }
}
