//! Netlink plumbing for [`super`]: a small TLV encoder/decoder and one synchronous socket.
//!
//! Input: messages built with [`Writer`] (header, family header, attributes, nests).
//! Output: the kernel's answers — per-message ACKs/errors of a request or batch ([`NlSocket::transact`]) and
//! the messages of a dump ([`NlSocket::dump`]). Sockets belong to the network namespace of the thread that
//! opens them. No `unsafe`: `netlink-sys` owns the fd. Bound: an answer that has not come [`RX_TIMEOUT`]
//! after the request is an [`Error::Io`] of kind `TimedOut` ("no answer within ..."), never a hang.

use std::io;
use std::time::{Duration, Instant};

use netlink_sys::Socket;
use nix::errno::Errno;

use super::{Error, Target};

/// Size of `struct nlmsghdr`.
pub(super) const NLMSG_HDRLEN: usize = 16;
/// `NLA_F_NESTED`: marks an attribute whose payload is more attributes.
const NLA_F_NESTED: u16 = 1 << 15;
/// Attribute type bits without the nested/byte-order flags (`NLA_TYPE_MASK`).
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
/// Receive buffer: netlink dump datagrams are at most 32 KiB, ACKs are tiny. One buffer per socket, reused.
const RX_BUFFER: usize = 64 * 1024;
/// How long to wait for the kernel's answer before giving up (it answers in microseconds; this only guards
/// against waiting forever on an answer that will never come). Counted from the request: each receive waits
/// at most this long (`SO_RCVTIMEO`), and messages that keep arriving without ending the wait do not extend it.
const RX_TIMEOUT: Duration = Duration::from_secs(5);

/// Rounds up to the 4-byte netlink alignment.
pub(super) fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Builds a buffer of netlink messages.
#[derive(Debug, Default)]
pub(super) struct Writer {
    pub(super) buf: Vec<u8>,
}

impl Writer {
    /// Starts a message; returns its offset for [`Writer::msg_end`].
    pub(super) fn msg_begin(&mut self, ty: u16, flags: u16, seq: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        start
    }

    /// Closes the message started at `start` by writing its length.
    pub(super) fn msg_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Appends a fixed family header (`nfgenmsg`, `rtmsg`, ...), padded.
    pub(super) fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    fn pad(&mut self) {
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
    }

    /// One attribute: u16 length (header + payload, unpadded), u16 type, payload, padding to 4 bytes.
    pub(super) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A big-endian u32 attribute (nf_tables sends all its integers in network order).
    pub(super) fn attr_be32(&mut self, ty: u16, value: u32) {
        self.attr(ty, &value.to_be_bytes());
    }

    /// A host-endian u32 attribute (rtnetlink).
    pub(super) fn attr_ne32(&mut self, ty: u16, value: u32) {
        self.attr(ty, &value.to_ne_bytes());
    }

    /// A NUL-terminated string attribute.
    pub(super) fn attr_str(&mut self, ty: u16, value: &str) {
        let len = (4 + value.len() + 1) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// Starts a nested attribute; returns its offset for [`Writer::nest_end`].
    pub(super) fn nest_begin(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    /// Closes the nest started at `start`.
    pub(super) fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Iterates over the attributes in `data`: `(type without flags, payload)`. Stops at the first malformed one.
pub(super) fn attrs(data: &[u8]) -> AttrIter<'_> {
    AttrIter { rest: data }
}

/// See [`attrs`].
pub(super) struct AttrIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let len = usize::from(u16::from_ne_bytes([
            *self.rest.first()?,
            *self.rest.get(1)?,
        ]));
        let ty = u16::from_ne_bytes([*self.rest.get(2)?, *self.rest.get(3)?]) & NLA_TYPE_MASK;
        if len < 4 || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let payload = &self.rest[4..len];
        self.rest = &self.rest[align(len).min(self.rest.len())..];
        Some((ty, payload))
    }
}

/// Reads a big-endian u32 attribute payload.
pub(super) fn be32(data: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(..4)?.try_into().ok()?))
}

/// Reads a host-endian u32 attribute payload.
pub(super) fn ne32(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

/// Reads a NUL-terminated string attribute payload.
pub(super) fn string(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// One message from the kernel.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reply<'a> {
    pub(super) ty: u16,
    pub(super) seq: u32,
    /// Everything after the `nlmsghdr`.
    pub(super) payload: &'a [u8],
}

impl Reply<'_> {
    /// For `NLMSG_ERROR`: the errno (0 means ACK).
    fn error(&self) -> Option<i32> {
        Some(-i32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?))
    }
}

fn messages(mut buf: &[u8]) -> impl Iterator<Item = Reply<'_>> {
    std::iter::from_fn(move || {
        let len = ne32(buf.get(..4)?)? as usize;
        if !(NLMSG_HDRLEN..=buf.len()).contains(&len) {
            buf = &[];
            return None;
        }
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = ne32(&buf[8..12])?;
        let reply = Reply {
            ty,
            seq,
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = &buf[align(len).min(buf.len())..];
        Some(reply)
    })
}

/// A bound netlink socket in the calling thread's network namespace.
pub(super) struct NlSocket {
    sock: Socket,
    rx: Vec<u8>,
    next_seq: u32,
    /// [`RX_TIMEOUT`], shorter in tests.
    timeout: Duration,
}

const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;

impl NlSocket {
    /// Opens and binds a socket of `protocol` (`NETLINK_NETFILTER`, `NETLINK_ROUTE`).
    pub(super) fn open(protocol: isize, name: &'static str) -> Result<NlSocket, Error> {
        NlSocket::open_with_timeout(protocol, name, RX_TIMEOUT)
    }

    /// [`NlSocket::open`], giving up on an answer after `timeout`.
    fn open_with_timeout(
        protocol: isize,
        name: &'static str,
        timeout: Duration,
    ) -> Result<NlSocket, Error> {
        let socket_err = |source: io::Error| {
            let errno = Errno::from_raw(source.raw_os_error().unwrap_or(0));
            match errno {
                Errno::EAFNOSUPPORT | Errno::EPROTONOSUPPORT
                    if protocol == netlink_sys::protocols::NETLINK_NETFILTER =>
                {
                    Error::NfTablesUnavailable {
                        target: Target::Batch,
                        errno,
                    }
                }
                _ => Error::Socket {
                    protocol: name,
                    source,
                },
            }
        };
        let mut sock = Socket::new(protocol).map_err(socket_err)?;
        sock.bind_auto().map_err(socket_err)?;
        let rcvtimeo = nix::sys::time::TimeVal::new(
            timeout.as_secs() as libc::time_t,
            timeout.subsec_micros() as libc::suseconds_t,
        );
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &rcvtimeo)
            .map_err(|e| socket_err(e.into()))?;
        Ok(NlSocket {
            sock,
            rx: Vec::with_capacity(RX_BUFFER),
            next_seq: 1,
            timeout,
        })
    }

    /// A fresh sequence number.
    pub(super) fn seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    /// Makes sure later sequence numbers come after `last` (used by a batch built from [`NlSocket::seq`]).
    pub(super) fn skip_past(&mut self, last: u32) {
        self.next_seq = self.next_seq.max(last.wrapping_add(1));
    }

    fn send(&self, buf: &[u8]) -> Result<(), Error> {
        let io_err = |source| Error::Io {
            op: "sending to netlink",
            source,
        };
        let sent = self.sock.send(buf, 0).map_err(io_err)?;
        if sent != buf.len() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", buf.len()),
            )));
        }
        Ok(())
    }

    /// Receives datagrams into the reusable buffer and hands each message in them to `f`, until `f` says stop;
    /// gives up when no answer has ended the wait within the timeout.
    fn recv_until(&mut self, mut f: impl FnMut(Reply<'_>) -> bool) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.rx.clear();
            let len = match self.sock.recv(&mut self.rx, libc::MSG_TRUNC) {
                Ok(len) => len,
                // SO_RCVTIMEO ran out: the kernel did not answer.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.no_answer())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(source) => {
                    return Err(Error::Io {
                        op: "receiving from netlink",
                        source,
                    })
                }
            };
            if len > self.rx.len() {
                return Err(Error::Malformed {
                    what: "netlink reply larger than the receive buffer",
                });
            }
            for reply in messages(&self.rx) {
                if f(reply) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(self.no_answer());
            }
        }
    }

    fn no_answer(&self) -> Error {
        Error::Io {
            op: "waiting for the kernel's netlink answer",
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.timeout),
            ),
        }
    }

    /// Sends `buf` (one request or a whole nfnetlink batch) and waits for the answers to the messages whose
    /// sequence numbers are in `acked` (they carry `NLM_F_ACK`). An error for any other sequence number in
    /// `all` (e.g. a rejected batch header) ends the wait too. Returns the non-zero errors, by sequence number.
    pub(super) fn transact(
        &mut self,
        buf: &[u8],
        acked: &[u32],
        all: std::ops::RangeInclusive<u32>,
    ) -> Result<Vec<(u32, Errno)>, Error> {
        self.send(buf)?;
        let mut errors = Vec::new();
        let mut answered = 0usize;
        if acked.is_empty() {
            return Ok(errors);
        }
        self.recv_until(|reply| {
            if reply.ty != NLMSG_ERROR || !all.contains(&reply.seq) {
                return false;
            }
            let code = reply.error().unwrap_or(libc::EBADMSG);
            if code != 0 {
                errors.push((reply.seq, Errno::from_raw(code)));
            }
            if acked.contains(&reply.seq) {
                answered += 1;
                answered >= acked.len()
            } else {
                true
            }
        })?;
        errors.sort_by_key(|(seq, _)| *seq);
        Ok(errors)
    }

    /// Sends a dump request (with sequence number `seq`) and hands every message of the answer to `f`.
    pub(super) fn dump(
        &mut self,
        buf: &[u8],
        seq: u32,
        target: Target,
        mut f: impl FnMut(Reply<'_>),
    ) -> Result<(), Error> {
        self.send(buf)?;
        let mut failed = None;
        self.recv_until(|reply| {
            if reply.seq != seq {
                return false;
            }
            match reply.ty {
                NLMSG_DONE => true,
                NLMSG_ERROR => {
                    let code = reply.error().unwrap_or(libc::EBADMSG);
                    if code != 0 {
                        failed = Some(Errno::from_raw(code));
                    }
                    true
                }
                _ => {
                    f(reply);
                    false
                }
            }
        })?;
        match failed {
            Some(errno) => Err(Error::from_errno(target, errno)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `NLMSG_NOOP`: the kernel answers it only when asked to ack (`NLM_F_ACK`).
    fn noop(seq: u32, ack: bool) -> Vec<u8> {
        let mut w = Writer::default();
        let flags = libc::NLM_F_REQUEST | if ack { libc::NLM_F_ACK } else { 0 };
        let start = w.msg_begin(libc::NLMSG_NOOP as u16, flags as u16, seq);
        w.msg_end(start);
        w.buf
    }

    #[test]
    fn a_request_the_kernel_never_answers_ends_in_a_timeout_error_not_a_hang() {
        let timeout = Duration::from_millis(50);
        let mut sock =
            NlSocket::open_with_timeout(netlink_sys::protocols::NETLINK_ROUTE, "route", timeout)
                .unwrap();
        let seq = sock.seq();
        let err = sock
            .transact(&noop(seq, false), &[seq], seq..=seq)
            .expect_err("no answer comes");
        match &err {
            Error::Io { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::TimedOut, "{err}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "waiting for the kernel's netlink answer: no answer within 50ms"
        );
        // The same request asking for an ack is answered on the same socket: the wait above was for an
        // answer that never came, not a broken socket.
        let seq = sock.seq();
        let errors = sock.transact(&noop(seq, true), &[seq], seq..=seq).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
    }
}
