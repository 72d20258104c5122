//! Handing app-facing sockets, with what each connection needs to continue, from the old proxy process to
//! the new one.
//!
//! **Job.** The new process ([`Receiver`]) listens on a unix socket path; the old one ([`send`]) connects
//! and hands over its connections in batches, each batch one `SOCK_SEQPACKET` packet carrying the
//! connections' records and, in one SCM_RIGHTS control message, their sockets. Every batch is
//! acknowledged, so the old process knows exactly which connections the new one took and keeps serving
//! the rest itself.
//!
//! **Inputs.** Sender: the path and a list of `(`[`Handed`]`, `[`Fds`]`)`: the connection's app-facing TCP
//! socket and, for a plain TCP connection, its peer-facing socket too (outbound, the upstream; inbound,
//! the client's; a resumable HBONE connection's tunnel does not move: it resumes). The caller has stopped reading and writing those sockets, and they are
//! registered with no epoll (tokio: `TcpStream::into_std` deregisters): the file stays open in the sender
//! until the batch is acknowledged, and an epoll registration lives as long as the file, so a forgotten
//! one would keep waking the old process. Receiver: the path.
//!
//! **Outputs.** [`send`] returns a [`SendReport`]: the ids taken, and every connection *not* taken with
//! its fds (`kept`), on success and on error alike. [`Receiver::accept_all`] returns a [`Received`]: the
//! connections taken (a plain one with its second fd), on success and on error alike. Each fd arrives
//! close-on-exec and is the same open file the sender had (O_NONBLOCK, socket options and a shut-down
//! write side come with it); the receiver registers it wherever it likes.
//!
//! **Conversation** (`S` = sender/old, `R` = receiver/new; one protobuf `Packet` per packet, see `wire`):
//!
//! ```text
//! S → R  Hello{version, connections}       R → S  Hello{version}   (R refuses a version it lacks after replying)
//! S → R  Batch{seq, records} + fds         R → S  Ack{seq, accepted} | Refuse{reason}
//! ...                                      (S sends the next batch only after reading the previous ack)
//! S → R  End                               (after the last ack)
//! S → R  Abort{reason}                     (instead, when S gave up on the ack of the batch it last sent)
//! ```
//!
//! **Who owns a connection when something fails** (the rule that keeps every connection served exactly
//! once). The sender counts a connection as taken only once it has *read* the ack of the packet holding the
//! connection's last record; until then it keeps its own fd, and everything not taken comes back in
//! `kept`. The receiver keeps every connection of every batch whose ack it *wrote*, except the last such
//! batch when the sender's next message is `Abort`: a sender that fails waiting for an ack sends `Abort`
//! (best effort) and keeps the batch. Other failures agree on their own: an ack the receiver wrote is in
//! the sender's socket buffer and readable even after the receiver closes; the receiver waits twice
//! [`IO_TIMEOUT`] for the sender's next message, so a live sender always gives up (and says `Abort`) first;
//! a sender that dies takes its own fds with it, so the receiver's copies are the only ones left. Batches
//! that fail (refused, truncated, timed out) are acknowledged by nobody: the receiver closes its fds, the
//! sender keeps its own. Cancelling either future drops the connections it holds; drive them to completion
//! (every step has a timeout).
//!
//! **Wire format.** prost messages written by hand (`wire`), no .proto: prost is already built here;
//! the buffered bytes travel as raw `bytes` (JSON would inflate them three- to four-fold as number
//! arrays); the packer needs an exact `encoded_len` to fill packets to the bound; and field tags let a
//! later version add fields (the tunnel side's resumption) that this one skips.
//!
//! **Versions, and the second fd.** Version 2 adds `peer_socket` to a connection's first record: a second
//! fd (the peer-facing socket of a plain TCP connection, [`Fds::peer`]) follows its app fd in the packet. Chosen over a
//! receiver that skips what it does not understand, because the fd count is not a field a receiver can
//! skip: a version 1 receiver that ignored `peer_socket` would count one fd per connection where two came
//! (it refuses the whole batch as [`Error::FdCount`], every resumable connection in it with it). So the
//! sender says version 1 when no connection carries a second fd (the conversation is then byte for byte
//! version 1's, so a rollback to an old receiver still takes resumable connections) and version 2 when
//! one does; an old receiver refuses version 2 at the hello, before any fd moves (nothing is taken with
//! one fd of two). The sender then connects again and hands over, at version 1, the connections with one
//! fd; the plain ones it keeps (a rollback to an old build hands over what that build understands). The receiver accepts both versions and answers with
//! the sender's, so an old sender (version 1, which refuses any other answer) hands over to a new
//! receiver as before; a version 1 conversation whose record says `peer_socket` is refused as malformed.
//!
//! **Bounds.** A packet is at most [`MAX_PACKET`] (64 KiB; both sides set SO_SNDBUF so the kernel takes
//! that much in one message) and carries at most [`MAX_FDS_PER_PACKET`] fds (the kernel's SCM_MAX_FD),
//! a connection's two fds counted as two and never split between packets. A
//! connection carries at most [`MAX_BUFFERED`] bytes each way, [`MAX_RESUME`] bytes of resumption state,
//! and [`MAX_NAME`] bytes of pod uid and of peer identity; a hand-over announces at most
//! [`MAX_CONNECTIONS`]. A connection's bytes travel in records of at most 16 KiB, so a large one spans
//! several records (the first carries the metadata and the fds, the rest continue it) and possibly several
//! packets; it is taken when its last record is acknowledged. Every read and write has an [`IO_TIMEOUT`]
//! deadline (the receiver's wait for the sender's next message, twice that). Anything else (a version
//! other than 1 or [`PROTOCOL_VERSION`], fds that do not match the records, MSG_TRUNC, MSG_CTRUNC, an oversize
//! value, a message out of order) ends the hand-over with a named [`Error`], the fds of the refused
//! packet closed on the receiver's side and kept on the sender's.
//!
//! Transport: `zds::packet` (AF_UNIX SOCK_SEQPACKET on tokio), its listener and connections as ZDS uses
//! them, with many fds per packet (`send_fds`) and truncation reported as flags (`recv_raw`) that
//! `read_with_fds` names; on both ends the send buffer is raised to `SEND_BUFFER` (SO_SNDBUF).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use prost::Message;
use socket2::SockRef;
use tokio::time::timeout;

use crate::zds::packet::{self, SeqpacketConn, SeqpacketListener};
use wire::{Body, Packet};

mod receiver;
mod sender;
mod wire;

#[cfg(test)]
mod tests;

/// The newest protocol version this build speaks: 2, a connection's second fd (see the module header).
/// The receiver also takes [`OLDEST_VERSION`]; the sender says that one when no connection has a second
/// fd.
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest version the receiver takes (and the sender says when it can): 1, one fd per connection.
pub const OLDEST_VERSION: u32 = 1;

/// Deadline for each read and write on the hand-over socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest packet either side sends or accepts, in bytes. Below the kernel's limit for one unix datagram
/// (the send buffer, which both sides raise to twice this), and room for 253 records of idle connections
/// with typical names (about 200 bytes each); records with longer names or buffered bytes fill more
/// packets.
pub const MAX_PACKET: usize = 64 * 1024;

/// Most fds in one packet: the kernel's `SCM_MAX_FD` (253), above which `sendmsg` fails with EINVAL.
pub const MAX_FDS_PER_PACKET: usize = packet::SCM_MAX_FD;

/// SO_SNDBUF asked for on both ends. A unix datagram must fit in the sender's buffer (less a little), and
/// the default (`net.core.wmem_default`) may be smaller than a packet on some machines; the kernel doubles
/// the value, capped by `wmem_max`, which is never below this.
const SEND_BUFFER: usize = 2 * MAX_PACKET;

// The receiver takes one sender at a time; the listener's accept queue must hold at least that one.
const _: () = assert!(packet::LISTEN_BACKLOG >= 1);

/// Most bytes a connection may carry in each direction (`to_app`, `to_peer`): what a resumable stream may
/// hold, a resend window and one read (`hbone::resume`).
pub const MAX_BUFFERED: usize =
    crate::hbone::resume::DEFAULT_WINDOW + crate::hbone::resume::MAX_DATA;

/// Most bytes of tunnel-resumption state (`resume`) a connection may carry (a resumable stream's is
/// `hbone::resume::copy::STATE_LEN` and its token).
pub const MAX_RESUME: usize = 16 * 1024;

/// Longest pod uid and peer identity, in bytes (a SPIFFE ID is at most 2048).
pub const MAX_NAME: usize = 2048;

/// Most connections one hand-over may announce: more than any fd limit allows, so only a sanity bound.
pub const MAX_CONNECTIONS: u64 = 1 << 20;

/// One connection being handed over: what the new process needs to carry on with it. Its app-facing
/// socket travels beside it as an fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The sender's id for the connection; opaque here, returned in [`SendReport::taken`].
    pub id: u64,
    /// The workload uid of the pod whose connection this is.
    pub pod: String,
    /// Which way the connection was made.
    pub direction: Direction,
    /// The destination the connection was for: the app's original destination (outbound), or the address
    /// the peer asked for (inbound).
    pub original_dst: SocketAddr,
    /// The far side of the tunnel: the upstream the proxy connected to (outbound), or the downstream peer
    /// (inbound).
    pub peer: SocketAddr,
    /// The peer's identity (SPIFFE ID), empty when it had none (plain TCP).
    pub peer_identity: String,
    /// Bytes received from the peer and not yet written to the app (at most [`MAX_BUFFERED`]).
    pub to_app: Vec<u8>,
    /// Bytes read from the app and not yet sent to the peer (at most [`MAX_BUFFERED`]).
    pub to_peer: Vec<u8>,
    /// Opaque state for resuming the tunnel side (at most [`MAX_RESUME`]); its format is the tunnel's.
    pub resume: Vec<u8>,
}

/// The sockets of a connection being handed over: its app-facing socket, and for a plain TCP connection
/// its peer-facing one (`None` for a resumable HBONE connection, whose tunnel resumes instead).
#[derive(Debug)]
pub struct Fds {
    /// The app-facing socket.
    pub app: OwnedFd,
    /// Plain TCP only: the socket to [`Handed::peer`] (outbound, the upstream the proxy opened; inbound,
    /// the client's connection the proxy accepted).
    pub peer: Option<OwnedFd>,
}

impl Fds {
    /// How many fds these are (1 or 2).
    pub fn count(&self) -> usize {
        1 + usize::from(self.peer.is_some())
    }
}

impl From<OwnedFd> for Fds {
    /// The app socket alone.
    fn from(app: OwnedFd) -> Fds {
        Fds { app, peer: None }
    }
}

impl AsFd for Fds {
    /// The app socket.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.app.as_fd()
    }
}

/// Which way a handed connection was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the pod's app out through the proxy (:15001).
    Outbound,
    /// From a peer into the pod's app (:15008 or :15006).
    Inbound,
}

impl Handed {
    /// Whether every value is within its bound, as the receiver checks it. [`send`] refuses the whole
    /// hand-over when one connection is not; call this first to keep such a connection out of it.
    pub fn check(&self) -> Result<(), Error> {
        let bounds = [
            ("pod", self.pod.len(), MAX_NAME),
            ("peer_identity", self.peer_identity.len(), MAX_NAME),
            ("to_app", self.to_app.len(), MAX_BUFFERED),
            ("to_peer", self.to_peer.len(), MAX_BUFFERED),
            ("resume", self.resume.len(), MAX_RESUME),
        ];
        match bounds.into_iter().find(|(_, len, max)| len > max) {
            Some((field, len, max)) => Err(Error::TooLarge {
                id: self.id,
                field,
                len,
                max,
            }),
            None => Ok(()),
        }
    }
}

/// What [`send`] did. Whatever happened, every connection is either in `taken` (the receiver has it; our
/// fd is closed) or in `kept` (ours to keep serving).
#[derive(Debug)]
#[must_use = "the connections in `kept` are still the caller's to serve"]
pub struct SendReport {
    /// Ids of the connections the receiver acknowledged, in the order given.
    pub taken: Vec<u64>,
    /// The connections not taken, with their fds, in the order given.
    pub kept: Vec<(Handed, Fds)>,
    /// Batches sent (acknowledged or not).
    pub packets: usize,
    /// Why the hand-over stopped early, if it did.
    pub error: Option<Error>,
}

/// What [`Receiver::accept_all`] took. Whatever happened, `conns` are the receiver's to serve: the sender
/// no longer does.
#[derive(Debug)]
#[must_use = "the connections in `conns` are the caller's to serve"]
pub struct Received {
    /// The connections taken, with their fds, in the sender's order.
    pub conns: Vec<(Handed, Fds)>,
    /// Batches acknowledged.
    pub packets: usize,
    /// Why the hand-over stopped early, if it did.
    pub error: Option<Error>,
}

/// Hands `conns` to the receiver listening at `path`. Returns when every connection is taken or the
/// hand-over failed; see [`SendReport`]. Do not cancel it: the connections not yet taken would be
/// dropped with it.
pub async fn send(path: &Path, conns: Vec<(Handed, Fds)>) -> SendReport {
    sender::send(path, conns, IO_TIMEOUT).await
}

/// A connection to the receiver, made before the connections to hand over are collected: a leaving
/// process first learns whether a new one is there, and only then pauses its connections.
#[derive(Debug)]
pub struct Sender {
    conn: SeqpacketConn,
    /// For a second attempt at version 1 (see the module header).
    path: std::path::PathBuf,
}

impl Sender {
    /// Connects to the receiver listening at `path` (within [`IO_TIMEOUT`]); an error when none listens.
    pub async fn connect(path: &Path) -> Result<Sender, Error> {
        Ok(Sender {
            conn: sender::connect(path, IO_TIMEOUT).await?,
            path: path.to_path_buf(),
        })
    }

    /// Hands `conns` over, as [`send`] does.
    pub async fn send(self, conns: Vec<(Handed, Fds)>) -> SendReport {
        sender::send_on(self.conn, &self.path, conns, IO_TIMEOUT).await
    }
}

/// The new process's end: a listening socket that one sender at a time hands its connections to. Dropping
/// it removes the socket file (if it is still the one it created).
#[derive(Debug)]
pub struct Receiver {
    listener: SeqpacketListener,
}

impl Receiver {
    /// Listens at `path` (socket file mode 0600), replacing a stale socket file there and refusing to
    /// remove anything else; missing parent directories are created (mode 0755).
    pub fn bind(path: &Path) -> Result<Receiver, Error> {
        let listener = packet::bind(path).map_err(|source| Error::Io {
            during: "binding the hand-over socket",
            source,
        })?;
        Ok(Receiver { listener })
    }

    /// Waits for a sender and takes every connection it hands over. The wait for a sender to connect may
    /// be cancelled (wrap it in a timeout); once one is connected, drive this to completion: every step
    /// has its own deadline, and cancelling would drop the connections taken so far.
    pub async fn accept_all(&self) -> Received {
        match self.listener.accept().await.map(with_send_buffer) {
            Ok(conn) => receiver::receive(&conn, IO_TIMEOUT).await,
            Err(source) => Received {
                conns: Vec::new(),
                packets: 0,
                error: Some(Error::Io {
                    during: "accepting the sender",
                    source,
                }),
            },
        }
    }
}

/// Why a hand-over stopped. The connections are never in here: see [`SendReport`] and [`Received`].
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer speaks another version of the protocol.
    #[error("hand-over protocol version {theirs} refused: this side speaks version {ours}")]
    Version {
        /// The version this side asked for (the sender) or speaks at most (the receiver).
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// A read or write did not finish within its deadline.
    #[error("timed out {during}")]
    Timeout {
        /// The step that timed out.
        during: &'static str,
    },
    /// A socket call failed.
    #[error("{during}: {source}")]
    Io {
        /// The step that failed.
        during: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The peer closed the hand-over socket.
    #[error("hand-over socket closed by the peer {during}")]
    Closed {
        /// The step during which the close was noticed.
        during: &'static str,
    },
    /// A packet was longer than the reader's buffer (MSG_TRUNC); its fds were closed.
    #[error(
        "packet longer than {max} bytes refused (MSG_TRUNC); the {fds} fds it carried are closed"
    )]
    Truncated {
        /// The buffer's size.
        max: usize,
        /// Fds that came with it (closed).
        fds: usize,
    },
    /// Not every fd of a packet arrived (MSG_CTRUNC: the receiver is out of fd numbers); the ones that did
    /// were closed.
    #[error("packet whose fds did not all arrive refused (MSG_CTRUNC: out of fd numbers?); the {received} that did are closed")]
    ControlTruncated {
        /// Fds that did arrive (closed).
        received: usize,
    },
    /// A packet carried a different number of fds from what its records call for (one per connection
    /// started, two for a plain TCP one).
    #[error("packet with {got} fds where its records call for {expected} refused")]
    FdCount {
        /// Fds the records call for (0 for a packet that is not a batch).
        expected: usize,
        /// Fds it carried.
        got: usize,
    },
    /// A packet was not a protobuf `Packet`.
    #[error("undecodable hand-over packet: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A message came where the conversation has no place for it.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the conversation waited for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// A connection's value is larger than its bound.
    #[error("connection {id}: {field} of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The connection's id.
        id: u64,
        /// The field.
        field: &'static str,
        /// Its length (so far, for bytes spread over several records).
        len: usize,
        /// Its bound.
        max: usize,
    },
    /// The sender announced more connections than [`MAX_CONNECTIONS`].
    #[error("{announced} connections announced, more than the {max} a hand-over takes")]
    TooMany {
        /// The announced count.
        announced: u64,
        /// [`MAX_CONNECTIONS`].
        max: u64,
    },
    /// A record or batch broke the protocol otherwise (order, continuation, address, counts).
    #[error("malformed hand-over: {0}")]
    Malformed(String),
    /// The receiver acknowledged a batch with the wrong sequence number or count.
    #[error("batch {seq} completed {expected} connections; the receiver acknowledged batch {got_seq} with {got}")]
    BadAck {
        /// The batch sent.
        seq: u64,
        /// Connections completed in it.
        expected: u64,
        /// The ack's sequence number.
        got_seq: u64,
        /// The ack's count.
        got: u64,
    },
    /// The receiver refused the hand-over (its reason).
    #[error("receiver refused the hand-over: {0}")]
    Refused(String),
    /// The sender gave up waiting for the last ack (its reason); that batch stays with it.
    #[error("sender aborted the hand-over: {0}")]
    Aborted(String),
}

/// `conn`, its send buffer raised to [`SEND_BUFFER`]. Best effort: a smaller buffer only matters if a
/// packet turns out not to fit (EMSGSIZE).
fn with_send_buffer(conn: SeqpacketConn) -> SeqpacketConn {
    let _ = SockRef::from(&conn).set_send_buffer_size(SEND_BUFFER);
    conn
}

/// Sends one packet, within `t`.
async fn write(
    conn: &SeqpacketConn,
    bytes: Vec<u8>,
    fds: &[BorrowedFd<'_>],
    t: Duration,
    during: &'static str,
) -> Result<(), Error> {
    match timeout(t, conn.send_fds(&bytes, fds)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::Io { during, source }),
        Err(_) => Err(Error::Timeout { during }),
    }
}

/// Reads one packet and its fds within `t`, refusing truncation (its fds closed), an empty packet or a
/// close, and anything that is not a `Packet` with a message.
async fn read_with_fds(
    conn: &SeqpacketConn,
    buf: &mut [u8],
    t: Duration,
    during: &'static str,
) -> Result<(Body, Vec<OwnedFd>), Error> {
    let incoming = match timeout(t, conn.recv_raw(buf)).await {
        Ok(Ok(incoming)) => incoming,
        Ok(Err(source)) => return Err(Error::Io { during, source }),
        Err(_) => return Err(Error::Timeout { during }),
    };
    if incoming.truncated {
        return Err(Error::Truncated {
            max: buf.len(),
            fds: incoming.fds.len(),
        });
    }
    if incoming.fds_truncated {
        return Err(Error::ControlTruncated {
            received: incoming.fds.len(),
        });
    }
    if incoming.len == 0 && incoming.fds.is_empty() {
        return Err(Error::Closed { during });
    }
    let packet = Packet::decode(&buf[..incoming.len])?;
    match packet.body {
        Some(body) => Ok((body, incoming.fds)),
        None => Err(Error::Malformed("packet without a message".into())),
    }
}

/// `got` where the conversation expected something else.
fn unexpected(expected: &'static str, got: &Body) -> Error {
    Error::Unexpected {
        expected,
        got: got.name(),
    }
}
