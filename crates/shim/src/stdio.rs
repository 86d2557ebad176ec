//! A process's stdio between the container and containerd. containerd hands the shim
//! the paths of FIFOs it reads and writes (or `file://` paths for logs, or nothing).
//! Without a terminal the container gets pipes and the shim copies them to and from the
//! FIFOs, so a client that goes away never blocks or kills the container's writes. With
//! a terminal, nestor sends the pty's master over a console socket, and the shim copies
//! between it and the FIFOs. Output FIFOs are opened read-write, which never blocks on a
//! missing reader. Stdin is opened read-only, so the container's stdin ends when
//! containerd's side closes it, or at CloseIO.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::fcntl::OFlag;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::runtime::ChildStdio;

/// The stdio paths containerd gave for one process.
#[derive(Clone, Debug, Default)]
pub struct Paths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The copies running for one process.
#[derive(Default)]
pub struct Copies {
    /// The stdin copy: aborted by CloseIO, which closes the container's stdin.
    stdin: Option<JoinHandle<()>>,
    /// The output copies: they end at the container side's EOF.
    outputs: Vec<JoinHandle<()>>,
    /// The pty master, for ResizePty.
    pub console: Option<OwnedFd>,
}

impl Copies {
    /// Close the process's stdin (CloseIO).
    pub fn close_stdin(&mut self) {
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
    }

    /// Wait for the output to be delivered, up to `limit` (the process has exited; a
    /// child it left behind may hold the pipe open).
    pub async fn drain(&mut self, limit: Duration) {
        let all = futures_join(std::mem::take(&mut self.outputs));
        let _ = tokio::time::timeout(limit, all).await;
        self.close_stdin();
    }

    /// Set the pty's window size.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(fd) = &self.console else {
            bail!("the process has no terminal");
        };
        let ws = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for
        // the call; the fd is the pty master this struct owns.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("TIOCSWINSZ");
        }
        Ok(())
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

fn dev_null(write: bool) -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
        .context("open /dev/null")?;
    Ok(f.into())
}

fn pipe2() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe2")
}

/// containerd's name for an output: a FIFO path, or `fifo://`/`file://` URIs.
enum Sink {
    Fifo(PathBuf),
    File(PathBuf),
}

fn sink(uri: &str) -> Result<Sink> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(Sink::File(p.into()));
    }
    if let Some(p) = uri.strip_prefix("fifo://") {
        return Ok(Sink::Fifo(p.into()));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        bail!("stdio URI scheme {scheme}:// is not supported (FIFOs and file:// are)");
    }
    Ok(Sink::Fifo(uri.into()))
}

/// A writer for an output path: the FIFO opened read-write (no wait for a reader), or
/// the log file opened for appending.
fn open_sink(uri: &str) -> Result<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> {
    Ok(match sink(uri)? {
        Sink::Fifo(p) => Box::new(
            pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&p)
                .with_context(|| format!("open FIFO {}", p.display()))?,
        ),
        Sink::File(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).ok();
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("open log {}", p.display()))?;
            Box::new(tokio::fs::File::from_std(f))
        }
    })
}

/// Copy containerd's stdin FIFO into `to`. The FIFO is opened for reading only and
/// without blocking: epoll reports nothing until containerd's side has opened it, and
/// EOF once that side has closed it, which ends the container's stdin.
fn spawn_stdin<W>(path: &str, to: W) -> Result<JoinHandle<()>>
where
    W: tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let p = path.strip_prefix("fifo://").unwrap_or(path);
    let from = pipe::OpenOptions::new()
        .open_receiver(p)
        .with_context(|| format!("open FIFO {p}"))?;
    Ok(spawn_copy(from, to))
}

/// Copy `from` to `to` until EOF or an error (a pty master reads EIO once the last
/// process holding its slave is gone), then close `to`.
fn spawn_copy<R, W>(mut from: R, mut to: W) -> JoinHandle<()>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
    W: tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.shutdown().await;
    })
}

/// Pipes for a process without a terminal: the container's ends, and the copies.
pub fn pipes(paths: &Paths) -> Result<(ChildStdio, Copies)> {
    let mut copies = Copies::default();
    let stdin = if paths.stdin.is_empty() {
        dev_null(false)?
    } else {
        let (r, w) = pipe2()?;
        let w = pipe::Sender::from_owned_fd(w).context("stdin pipe")?;
        copies.stdin = Some(spawn_stdin(&paths.stdin, w)?);
        r
    };
    let mut output = |uri: &str| -> Result<OwnedFd> {
        if uri.is_empty() {
            return dev_null(true);
        }
        let to = open_sink(uri)?;
        let (r, w) = pipe2()?;
        let r = pipe::Receiver::from_owned_fd(r).context("output pipe")?;
        copies.outputs.push(spawn_copy(r, to));
        Ok(w)
    };
    let stdout = output(&paths.stdout)?;
    let stderr = output(&paths.stderr)?;
    Ok((
        ChildStdio {
            stdin,
            stdout,
            stderr,
        },
        copies,
    ))
}

/// A console socket for a process with a terminal: a listener at a fresh path, whose
/// one connection brings the pty master.
pub struct ConsoleSocket {
    pub path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl ConsoleSocket {
    /// A socket in `dir` (short: a socket path has at most 107 bytes), named after the
    /// shim and `name`.
    pub fn new(dir: &Path, name: &str) -> Result<ConsoleSocket> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("console-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("bind console socket {}", path.display()))?;
        Ok(ConsoleSocket { path, listener })
    }

    /// The master nestor sends (within `limit`); the socket file is removed.
    pub async fn receive(self, limit: Duration) -> Result<OwnedFd> {
        let accepted = tokio::time::timeout(limit, self.listener.accept()).await;
        let _ = std::fs::remove_file(&self.path);
        let (stream, _) = accepted.context("nestor sent no terminal")??;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        tokio::task::spawn_blocking(move || recv_fd(stream.as_raw_fd())).await?
    }
}

fn recv_fd(sock: RawFd) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .context("receive the terminal")?;
    for c in msg.cmsgs().context("control messages")? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                for &extra in &fds[1..] {
                    // SAFETY: each fd came to this process with the message and is
                    // owned by nothing else; closing the ones not used.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: as above: the received fd is new and owned only here.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    bail!("the console socket's message carried no descriptor")
}

/// Copies between a pty master and a process's FIFOs (stderr is the terminal too).
pub fn terminal(master: OwnedFd, paths: &Paths) -> Result<Copies> {
    let mut copies = Copies::default();
    nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
    )
    .context("pty master non-blocking")?;
    let dup = |fd: &OwnedFd| fd.try_clone().context("dup pty master");
    if !paths.stdin.is_empty() {
        // A pty master polls as a pipe does; the unchecked constructor only skips the
        // FIFO file-type check.
        let to = pipe::Sender::from_owned_fd_unchecked(dup(&master)?).context("pty")?;
        copies.stdin = Some(spawn_stdin(&paths.stdin, to)?);
    }
    if !paths.stdout.is_empty() {
        let to = open_sink(&paths.stdout)?;
        let from = pipe::Receiver::from_owned_fd_unchecked(dup(&master)?).context("pty")?;
        copies.outputs.push(spawn_copy(from, to));
    }
    copies.console = Some(master);
    Ok(copies)
}

/// The null stdio of a terminal process's runtime call.
pub fn null_stdio() -> Result<ChildStdio> {
    Ok(ChildStdio {
        stdin: dev_null(false)?,
        stdout: dev_null(true)?,
        stderr: dev_null(true)?,
    })
}
