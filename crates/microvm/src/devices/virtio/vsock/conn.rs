//! One vsock connection: its host Unix stream, its state (reading the host's CONNECT
//! line, waiting for the guest, established), the bytes buffered for a slow host reader,
//! both sides' credit counters, and the next packet it has for the guest.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::*;
use super::{CONN_BUF, HOST_CID};

// Pending control packets of a connection.
pub(super) const P_REQUEST: u8 = 1;
pub(super) const P_RESPONSE: u8 = 2;
pub(super) const P_CREDIT_UPDATE: u8 = 4;
pub(super) const P_CREDIT_REQUEST: u8 = 8;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated, reading `CONNECT <port>\n`.
    ReadConnect(Vec<u8>),
    /// Host-initiated, OP_REQUEST sent or queued; waiting for the guest.
    Requested,
    /// Both sides agreed.
    Established,
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) state: State,
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    /// Guest → host bytes not yet taken by the host stream; the first `tx_prefix` of
    /// them are the `OK` line, which the guest's credit does not cover.
    pub(super) tx_buf: VecDeque<u8>,
    pub(super) tx_prefix: usize,
    pub(super) fwd_cnt: u32,
    pub(super) adv_fwd_cnt: u32,
    /// Host → guest accounting and the guest's latest credit.
    pub(super) rx_cnt: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    pub(super) credit_asked: bool,
    /// The host stream is (maybe) readable and not yet drained.
    pub(super) readable: bool,
    pub(super) host_eof: bool,
    pub(super) peer_shut: u32,
    pub(super) pend: u8,
    pub(super) queued: bool,
    pub(super) interest: EventSet,
}

pub(super) enum Next {
    Packet(Header, usize),
    Nothing,
    Kill,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, state: State) -> Self {
        Conn {
            stream,
            state,
            local_port: 0,
            peer_port: 0,
            tx_buf: VecDeque::new(),
            tx_prefix: 0,
            fwd_cnt: 0,
            adv_fwd_cnt: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_asked: false,
            readable: false,
            host_eof: false,
            peer_shut: 0,
            pend: 0,
            queued: false,
            interest: EventSet::empty(),
        }
    }

    pub(super) fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    pub(super) fn can_send_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shut & SHUTDOWN_RCV == 0
    }

    pub(super) fn wants_rx(&self) -> bool {
        self.pend != 0 || (self.readable && self.can_send_data() && self.credit() > 0)
    }

    pub(super) fn wanted_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        match self.state {
            State::ReadConnect(_) => e |= EventSet::IN,
            State::Requested => {}
            State::Established => {
                if !self.readable && self.can_send_data() {
                    e |= EventSet::IN;
                }
                if !self.tx_buf.is_empty() {
                    e |= EventSet::OUT;
                }
            }
        }
        e
    }

    pub(super) fn header(&self, cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt,
        }
    }

    pub(super) fn rst(&self, cid: u64) -> Header {
        self.header(cid, OP_RST)
    }

    /// The next packet for the guest, with up to `max` payload bytes read into `buf`.
    pub(super) fn next_packet(&mut self, cid: u64, max: usize, buf: &mut [u8]) -> Next {
        let take = |c: &mut Conn, flag: u8| {
            let had = c.pend & flag != 0;
            c.pend &= !flag;
            had
        };
        let mut h = if take(self, P_REQUEST) {
            self.header(cid, OP_REQUEST)
        } else if take(self, P_RESPONSE) {
            self.header(cid, OP_RESPONSE)
        } else if take(self, P_CREDIT_REQUEST) {
            self.header(cid, OP_CREDIT_REQUEST)
        } else if self.readable && self.can_send_data() && self.credit() > 0 && max > 0 {
            let n = (self.credit() as usize).min(max).min(buf.len());
            match self.stream.read(&mut buf[..n]) {
                Ok(0) => {
                    // The host will send nothing more.
                    self.readable = false;
                    self.host_eof = true;
                    let mut h = self.header(cid, OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND;
                    h
                }
                Ok(k) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(k as u32);
                    let mut h = self.header(cid, OP_RW);
                    h.len = k as u32;
                    self.pend &= !P_CREDIT_UPDATE;
                    self.adv_fwd_cnt = self.fwd_cnt;
                    return Next::Packet(h, k);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    if take(self, P_CREDIT_UPDATE) {
                        self.header(cid, OP_CREDIT_UPDATE)
                    } else {
                        return Next::Nothing;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Next::Nothing,
                Err(_) => return Next::Kill,
            }
        } else if take(self, P_CREDIT_UPDATE) {
            self.header(cid, OP_CREDIT_UPDATE)
        } else {
            return Next::Nothing;
        };
        // Every packet carries the device's credit.
        self.pend &= !P_CREDIT_UPDATE;
        self.adv_fwd_cnt = self.fwd_cnt;
        h.len = 0;
        Next::Packet(h, 0)
    }

    /// Writes what the host stream takes from the buffer; false when the stream is gone.
    pub(super) fn flush(&mut self) -> bool {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return false,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let p = n.min(self.tx_prefix);
                    self.tx_prefix -= p;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - p) as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.fwd_cnt.wrapping_sub(self.adv_fwd_cnt) >= CONN_BUF / 4 {
            self.pend |= P_CREDIT_UPDATE;
        }
        if self.tx_buf.is_empty() && self.peer_shut & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }

    /// Takes guest data for the host stream; false on a credit violation or a dead
    /// stream.
    pub(super) fn push(&mut self, data: &[u8]) -> bool {
        if self.tx_buf.len() - self.tx_prefix + data.len() > CONN_BUF as usize {
            tracing::debug!(
                "vsock: guest overran its credit on port {}",
                self.local_port
            );
            return false;
        }
        self.tx_buf.extend(data);
        self.flush()
    }
}
