//! `-t`: the OCI console socket on nestor's side (receive the pty master the container
//! made) and the copy loop between the user's terminal and that pty.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios;

pub struct ConsoleListener {
    listener: UnixListener,
    pub path: PathBuf,
}

impl ConsoleListener {
    pub fn new(dir: &Path) -> Result<Self> {
        let path = dir.join("console.sock");
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("listen on {}", path.display()))?;
        Ok(ConsoleListener { listener, path })
    }

    /// Accept the container's connection and take the pty master it sends.
    pub fn accept_master(&self) -> Result<OwnedFd> {
        let (s, _) = self
            .listener
            .accept()
            .context("accept console connection")?;
        let fd = nestor_container::sys::recv_fd(s.as_raw_fd())?;
        let _ = std::fs::remove_file(&self.path);
        Ok(fd)
    }
}

/// Puts the user's terminal in raw mode while alive.
struct RawMode(Option<termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        match termios::tcgetattr(stdin.as_fd()) {
            Ok(orig) => {
                let mut raw = orig.clone();
                termios::cfmakeraw(&mut raw);
                let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw);
                RawMode(Some(orig))
            }
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), termios::SetArg::TCSANOW, t);
        }
    }
}

fn copy_winsize(master: &OwnedFd) {
    // SAFETY: winsize is a plain C struct of integers, for which all zeroes is a valid
    // value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ/TIOCSWINSZ with a valid winsize.
    unsafe {
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
        }
    }
}

/// Copy stdin -> pty and pty -> stdout until the container side closes.
pub fn proxy(master: OwnedFd, interactive: bool) -> std::thread::JoinHandle<()> {
    copy_winsize(&master);
    let input = master.try_clone().ok();
    proxy_split(master, input, interactive)
}

/// Copy stdin -> `input` and `output` -> stdout (the user's terminal in raw mode when
/// interactive) until `output` ends: a pty master, or a VM container's terminal
/// carried on two streams.
pub fn proxy_split(
    output: OwnedFd,
    input: Option<OwnedFd>,
    interactive: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _raw = if interactive {
            Some(RawMode::enter())
        } else {
            None
        };
        let mut out = std::io::stdout();
        let mut m = std::fs::File::from(output);
        let mut inp = input.map(std::fs::File::from);
        let mut stdin_open = interactive && inp.is_some();
        let mut buf = [0u8; 8192];
        loop {
            let stdin = std::io::stdin();
            let sfd = stdin.as_fd();
            let mut fds = vec![PollFd::new(m.as_fd(), PollFlags::POLLIN)];
            if stdin_open {
                fds.push(PollFd::new(sfd, PollFlags::POLLIN));
            }
            if poll(&mut fds, PollTimeout::NONE).is_err() {
                continue;
            }
            let m_ev = fds[0].revents().unwrap_or(PollFlags::empty());
            let s_ev = fds
                .get(1)
                .and_then(|f| f.revents())
                .unwrap_or(PollFlags::empty());
            drop(fds);
            if m_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                match m.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = out.write_all(&buf[..n]);
                        let _ = out.flush();
                    }
                }
            }
            if s_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                match std::io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => stdin_open = false,
                    Ok(n) => {
                        if let Some(i) = inp.as_mut() {
                            let _ = i.write_all(&buf[..n]);
                        }
                    }
                }
            }
        }
    })
}
