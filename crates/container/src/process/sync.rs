//! The runtime's sync channel with the processes it forks: a SOCK_SEQPACKET pair
//! ([`Channel`]), one datagram per [`Msg`], and the only place the messages' bytes are
//! written and read.
//!
//! The wire form is one tag byte and, for two messages, a payload:
//!
//! | message | bytes | direction |
//! |---|---|---|
//! | [`Msg::MapUser`] | `U` | child -> runtime: the user namespace exists, write its id maps |
//! | [`Msg::UserMapped`] | `u` | runtime -> child: the id maps are written |
//! | [`Msg::Pid`] | `P` + decimal pid | child -> runtime: the container's process (host pid) exists, put it in its cgroup |
//! | [`Msg::Go`] | `g` | runtime -> child: go on (the cgroup holds the process) |
//! | [`Msg::Hooks`] | `H` | child -> runtime: mounts made, before pivot_root: run the prestart and createRuntime hooks |
//! | [`Msg::HooksDone`] | `h` + decimal pid | runtime -> child: they ran; the container's host pid, for the hooks' state |
//! | [`Msg::HookFailed`] | `F` + UTF-8 message | child -> runtime: a createContainer or startContainer hook failed |
//! | [`Msg::Ready`] | `R` | child -> runtime: set up, about to wait on the exec fifo or exec |
//! | [`Msg::Error`] | `E` + UTF-8 message | child -> runtime: set-up failed; the runtime reports the message verbatim |
//!
//! Both ends are close-on-exec, so in `run` the end of the channel (no message at all)
//! proves the container's program was exec'd.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;

use crate::error::{Context, Error, Result};

/// Largest datagram read; a longer [`Msg::Error`] is cut to this many bytes.
const MAX_MSG: usize = 8192;

/// One message on the sync channel (see the module docs for the bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Msg {
    /// The child unshared its user namespace: the runtime writes the id maps.
    MapUser,
    /// The runtime wrote the id maps.
    UserMapped,
    /// The container's process exists with this host pid.
    Pid(i32),
    /// The runtime released the process (it is in its cgroup).
    Go,
    /// Mounts are made: the runtime runs its create-time hooks now.
    Hooks,
    /// The runtime's hooks ran; the container process's host pid.
    HooksDone(i32),
    /// The process is set up and about to exec (or to wait on the exec fifo).
    Ready,
    /// Set-up failed with this message.
    Error(String),
    /// A hook the container's process runs failed (the message names it).
    HookFailed(String),
    /// The seccomp filter is installed; its notification listener comes with this
    /// message (SCM_RIGHTS) for the runtime to pass to the seccomp agent.
    Seccomp,
    /// The runtime gave the listener to the agent.
    SeccompDone,
}

impl Msg {
    /// The datagram carrying this message.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Msg::MapUser => b"U".to_vec(),
            Msg::UserMapped => b"u".to_vec(),
            Msg::Pid(pid) => format!("P{pid}").into_bytes(),
            Msg::Go => b"g".to_vec(),
            Msg::Ready => b"R".to_vec(),
            Msg::Hooks => b"H".to_vec(),
            Msg::HooksDone(pid) => format!("h{pid}").into_bytes(),
            Msg::Error(m) => [b"E", m.as_bytes()].concat(),
            Msg::HookFailed(m) => [b"F", m.as_bytes()].concat(),
            Msg::Seccomp => b"S".to_vec(),
            Msg::SeccompDone => b"s".to_vec(),
        }
    }

    /// The message a (non-empty) datagram carries.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Msg> {
        let bad = || {
            Error::Init(format!(
                "unexpected message from the runtime's other end: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
            ))
        };
        let (&tag, rest) = bytes.split_first().ok_or_else(bad)?;
        let bare = |m: Msg| if rest.is_empty() { Ok(m) } else { Err(bad()) };
        match tag {
            b'U' => bare(Msg::MapUser),
            b'u' => bare(Msg::UserMapped),
            b'g' => bare(Msg::Go),
            b'R' => bare(Msg::Ready),
            b'H' => bare(Msg::Hooks),
            b'S' => bare(Msg::Seccomp),
            b's' => bare(Msg::SeccompDone),
            b'h' => std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&pid: &i32| pid > 0)
                .map(Msg::HooksDone)
                .ok_or_else(bad),
            b'P' => std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&pid: &i32| pid > 0)
                .map(Msg::Pid)
                .ok_or_else(bad),
            b'E' => Ok(Msg::Error(String::from_utf8_lossy(rest).into_owned())),
            b'F' => Ok(Msg::HookFailed(String::from_utf8_lossy(rest).into_owned())),
            _ => Err(bad()),
        }
    }
}

/// One end of the sync channel.
pub(crate) struct Channel {
    fd: OwnedFd,
    /// A descriptor that came with the last message received (SCM_RIGHTS).
    fd_in: std::cell::RefCell<Option<OwnedFd>>,
}

impl Channel {
    /// A connected pair (runtime end, child end), both close-on-exec.
    pub(crate) fn pair() -> Result<(Channel, Channel)> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .ctx(|| "socketpair")?;
        Ok((
            Channel {
                fd: a,
                fd_in: Default::default(),
            },
            Channel {
                fd: b,
                fd_in: Default::default(),
            },
        ))
    }

    /// The descriptor (for closing the other end in a child).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends one message.
    pub(crate) fn send(&self, msg: &Msg) -> Result<()> {
        nix::unistd::write(&self.fd, &msg.encode()).ctx(|| "send on sync channel")?;
        Ok(())
    }

    /// Sends one message with a descriptor (SCM_RIGHTS).
    pub(crate) fn send_with_fd(&self, msg: &Msg, fd: std::os::fd::RawFd) -> Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let bytes = msg.encode();
        let iov = [std::io::IoSlice::new(&bytes)];
        let fds = [fd];
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .ctx(|| "send a descriptor on sync channel")?;
        Ok(())
    }

    /// The descriptor that came with the last message received, if any.
    pub(crate) fn take_fd(&self) -> Option<OwnedFd> {
        self.fd_in.borrow_mut().take()
    }

    /// Receives one message; `None` when the other end closed the channel (it exited or
    /// exec'd). A descriptor sent with it is kept for [`Channel::take_fd`].
    pub(crate) fn recv(&self) -> Result<Option<Msg>> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::FromRawFd;
        let mut buf = vec![0u8; MAX_MSG];
        loop {
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let (n, fds) = match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = m.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(f) = c {
                                fds.extend(f);
                            }
                        }
                    }
                    (m.bytes, fds)
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).ctx(|| "receive on sync channel"),
            };
            for fd in fds {
                // SAFETY: SCM_RIGHTS gave this process a new descriptor.
                *self.fd_in.borrow_mut() = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                return Ok(None);
            }
            return Msg::decode(&buf[..n]).map(Some);
        }
    }

    /// Waits for [`Msg::Go`]; anything else (or the end of the channel) is an error
    /// saying the runtime did not release `what`.
    pub(crate) fn wait_go(&self, what: &str) -> Result<()> {
        match self.recv()? {
            Some(Msg::Go) => Ok(()),
            _ => Err(Error::Init(format!("runtime did not release {what}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_in_its_wire_form() {
        let cases = [
            (Msg::MapUser, &b"U"[..]),
            (Msg::UserMapped, b"u"),
            (Msg::Pid(4242), b"P4242"),
            (Msg::Go, b"g"),
            (Msg::Ready, b"R"),
            (Msg::Hooks, b"H"),
            (Msg::HooksDone(17), b"h17"),
            (Msg::Seccomp, b"S"),
            (Msg::SeccompDone, b"s"),
            (
                Msg::Error("mount /proc: EPERM".into()),
                b"Emount /proc: EPERM",
            ),
            (Msg::Error(String::new()), b"E"),
            (
                Msg::HookFailed("startContainer hook #0".into()),
                b"FstartContainer hook #0",
            ),
        ];
        for (msg, wire) in cases {
            assert_eq!(msg.encode(), wire, "{msg:?}");
            assert_eq!(Msg::decode(wire).unwrap(), msg);
        }
    }

    #[test]
    fn malformed_datagrams_are_errors() {
        for bad in [
            &b""[..],
            b"x",
            b"Ux",
            b"gg",
            b"P",
            b"P-1",
            b"P0",
            b"P12a",
            b"P99999999999",
        ] {
            assert!(Msg::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_cross_a_channel_and_its_end_is_none() {
        let (a, b) = Channel::pair().unwrap();
        b.send(&Msg::Pid(7)).unwrap();
        b.send(&Msg::Error("no such file".into())).unwrap();
        assert_eq!(a.recv().unwrap(), Some(Msg::Pid(7)));
        assert_eq!(a.recv().unwrap(), Some(Msg::Error("no such file".into())));
        a.send(&Msg::Ready).unwrap();
        assert!(b.wait_go("the test").is_err());
        a.send(&Msg::Go).unwrap();
        b.wait_go("the test").unwrap();
        drop(b);
        assert_eq!(a.recv().unwrap(), None);
    }
}
