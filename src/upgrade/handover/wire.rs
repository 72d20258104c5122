//! The hand-over's messages and the two halves of batching: [`Packer`] cuts the sender's connections into
//! packets, [`Assembler`] checks and puts them back together on the receiver's side.
//!
//! Messages are prost structs written by hand (tags below are the wire format; there is no .proto). One
//! packet is one [`Packet`]. A connection travels as one or more [`Record`]s in sequence: the first
//! (`continued = false`) carries its metadata and claims the packet's next fd, and the one after it too
//! when it says `peer_socket` (version 2); continuations carry the
//! same `id` and more bytes; `more` says whether another record of it follows. Its bytes are the
//! concatenation `to_app ‖ to_peer ‖ resume`, cut into records of at most [`FRAGMENT_BYTES`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use prost::Message;

use super::{
    Direction, Error, Fds, Handed, MAX_BUFFERED, MAX_CONNECTIONS, MAX_FDS_PER_PACKET, MAX_NAME,
    MAX_PACKET, MAX_RESUME, OLDEST_VERSION,
};

/// Most bytes of `to_app ‖ to_peer ‖ resume` in one record. With the metadata at its bounds a record stays
/// under a third of a packet, so a packet always has room for one and usually for several.
const FRAGMENT_BYTES: usize = 16 * 1024;

/// Longest address text accepted (`[v6%scope]:port` is under 64).
const MAX_ADDRESS: usize = 64;

/// What a packet's envelope adds around its `Batch`: the oneof key (1 byte) and a length varint (3 bytes
/// cover anything under 2 MiB).
const ENVELOPE: usize = 4;

/// One packet.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Packet {
    /// The message.
    #[prost(oneof = "Body", tags = "1, 2, 3, 4, 5, 6")]
    pub(super) body: Option<Body>,
}

/// The messages of the conversation (see the module header of `handover`).
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum Body {
    /// First message each way.
    #[prost(message, tag = "1")]
    Hello(Hello),
    /// Sender: records, with their fds.
    #[prost(message, tag = "2")]
    Batch(Batch),
    /// Receiver: the batch is taken.
    #[prost(message, tag = "3")]
    Ack(Ack),
    /// Sender: every connection was acknowledged.
    #[prost(message, tag = "4")]
    End(End),
    /// Sender: it gave up waiting for the last ack and keeps that batch.
    #[prost(message, tag = "5")]
    Abort(Reason),
    /// Receiver: it refuses the hand-over (takes nothing more).
    #[prost(message, tag = "6")]
    Refuse(Reason),
}

impl Body {
    /// The message's name, for errors.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Body::Hello(_) => "hello",
            Body::Batch(_) => "batch",
            Body::Ack(_) => "ack",
            Body::End(_) => "end",
            Body::Abort(_) => "abort",
            Body::Refuse(_) => "refuse",
        }
    }

    /// The packet holding this message.
    pub(super) fn into_packet(self) -> Vec<u8> {
        Packet { body: Some(self) }.encode_to_vec()
    }
}

/// First message each way.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Hello {
    /// The sender's protocol version.
    #[prost(uint32, tag = "1")]
    pub(super) version: u32,
    /// Sender: how many connections it will hand over (0 from the receiver).
    #[prost(uint64, tag = "2")]
    pub(super) connections: u64,
}

/// Records, in order; their fds travel in the packet's SCM_RIGHTS message, one per record that starts a
/// connection and a second for one that says `peer_socket`, in the same order.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Batch {
    /// 0 for the first batch, then one more each.
    #[prost(uint64, tag = "1")]
    pub(super) seq: u64,
    /// The records.
    #[prost(message, repeated, tag = "2")]
    pub(super) records: Vec<Record>,
}

/// The receiver's answer to a batch.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Ack {
    /// The batch's `seq`.
    #[prost(uint64, tag = "1")]
    pub(super) seq: u64,
    /// Connections whose last record was in the batch, now the receiver's.
    #[prost(uint64, tag = "2")]
    pub(super) accepted: u64,
}

/// Sender: done.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct End {}

/// Why a side stopped (`Abort`, `Refuse`).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Reason {
    /// Human-readable, at most [`MAX_REASON`] bytes.
    #[prost(string, tag = "1")]
    pub(super) reason: String,
}

/// Longest reason sent, in bytes.
const MAX_REASON: usize = 512;

impl Reason {
    /// `error`'s text, cut to [`MAX_REASON`] bytes.
    pub(super) fn of(error: &Error) -> Reason {
        let mut reason = error.to_string();
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        Reason { reason }
    }
}

/// One record: a connection's start, or the continuation of the one before it.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Record {
    /// [`Handed::id`].
    #[prost(uint64, tag = "1")]
    pub(super) id: u64,
    /// Continues the connection of the previous record (same id); carries bytes only.
    #[prost(bool, tag = "2")]
    pub(super) continued: bool,
    /// Another record of this connection follows.
    #[prost(bool, tag = "3")]
    pub(super) more: bool,
    /// [`Handed::pod`].
    #[prost(string, tag = "4")]
    pub(super) pod: String,
    /// [`Handed::direction`].
    #[prost(enumeration = "WireDirection", tag = "5")]
    pub(super) direction: i32,
    /// [`Handed::original_dst`], as `ip:port`.
    #[prost(string, tag = "6")]
    pub(super) original_dst: String,
    /// [`Handed::peer`], as `ip:port`.
    #[prost(string, tag = "7")]
    pub(super) peer: String,
    /// [`Handed::peer_identity`].
    #[prost(string, tag = "8")]
    pub(super) peer_identity: String,
    /// The next part of [`Handed::to_app`].
    #[prost(bytes = "vec", tag = "9")]
    pub(super) to_app: Vec<u8>,
    /// The next part of [`Handed::to_peer`].
    #[prost(bytes = "vec", tag = "10")]
    pub(super) to_peer: Vec<u8>,
    /// The next part of [`Handed::resume`].
    #[prost(bytes = "vec", tag = "11")]
    pub(super) resume: Vec<u8>,
    /// First record only, version 2: the connection's peer-facing socket follows its app socket
    /// ([`Fds::peer`]).
    #[prost(bool, tag = "12")]
    pub(super) peer_socket: bool,
}

/// [`Direction`] on the wire; 0 is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(super) enum WireDirection {
    /// Not set: refused.
    Unspecified = 0,
    /// [`Direction::Outbound`].
    Outbound = 1,
    /// [`Direction::Inbound`].
    Inbound = 2,
}

/// One batch ready to send.
#[derive(Debug)]
pub(super) struct Packed {
    /// Its sequence number.
    pub(super) seq: u64,
    /// The encoded packet (at most [`MAX_PACKET`] bytes).
    pub(super) bytes: Vec<u8>,
    /// Indexes (into the queue given to [`Packer::next`]) of the connections whose fds go with it (each
    /// connection's app fd, then its peer fd if it has one).
    pub(super) fds: Vec<usize>,
    /// Connections whose last record is in it: the front of the queue, once it is acknowledged.
    pub(super) completed: usize,
}

/// The sender's cursor: which connection, and how far into its bytes, the next packet starts at.
#[derive(Debug, Default)]
pub(super) struct Packer {
    /// Index into the queue of the connection the next record is of.
    next: usize,
    /// Bytes of that connection already sent (0: its first record is next).
    offset: usize,
    /// The next batch's sequence number.
    seq: u64,
}

impl Packer {
    /// The next batch of `queue` (whose first `taken` connections have been popped since the last call, see
    /// [`Packer::taken`]), or `None` when every connection has been packed. Records are added while the
    /// packet stays within [`MAX_PACKET`] and [`MAX_FDS_PER_PACKET`] (a connection's two fds never split).
    pub(super) fn next(&mut self, queue: &VecDeque<(Handed, Fds)>) -> Option<Packed> {
        let (handed, conn_fds) = queue.get(self.next)?;
        let mut batch = Batch {
            seq: self.seq,
            records: Vec::new(),
        };
        let mut size = batch.encoded_len();
        let (mut fds, mut fd_count, mut completed) = (Vec::new(), 0, 0);
        let mut current = Some((handed, conn_fds));
        while let Some((handed, conn_fds)) = current {
            let first = self.offset == 0;
            if first && fd_count + conn_fds.count() > MAX_FDS_PER_PACKET {
                break;
            }
            let total = handed.to_app.len() + handed.to_peer.len() + handed.resume.len();
            let chunk = (total - self.offset).min(FRAGMENT_BYTES);
            let peer_socket = conn_fds.peer.is_some();
            let record = fragment(handed, self.offset, chunk, first, peer_socket);
            let len = prost::encoding::message::encoded_len(2, &record);
            // The first record always fits: a record is under a third of a packet (FRAGMENT_BYTES plus
            // bounded metadata), which `Handed::check` guaranteed before packing.
            if size + len + ENVELOPE > MAX_PACKET && !batch.records.is_empty() {
                break;
            }
            size += len;
            batch.records.push(record);
            if first {
                fds.push(self.next);
                fd_count += conn_fds.count();
            }
            self.offset += chunk;
            if self.offset == total {
                self.next += 1;
                self.offset = 0;
                completed += 1;
                current = queue.get(self.next).map(|(h, f)| (h, f));
            }
        }
        let seq = self.seq;
        self.seq += 1;
        Some(Packed {
            seq,
            bytes: Body::Batch(batch).into_packet(),
            fds,
            completed,
        })
    }

    /// `n` connections were popped off the front of the queue (acknowledged).
    pub(super) fn taken(&mut self, n: usize) {
        self.next -= n;
    }
}

/// The record of `handed` covering `offset..offset + chunk` of its bytes; `peer_socket`: it has a second
/// fd.
fn fragment(
    handed: &Handed,
    offset: usize,
    chunk: usize,
    first: bool,
    peer_socket: bool,
) -> Record {
    let end = offset + chunk;
    let mut base = 0;
    let mut part = |bytes: &[u8]| {
        let (lo, hi) = (
            offset.clamp(base, base + bytes.len()),
            end.clamp(base, base + bytes.len()),
        );
        let out = bytes[lo - base..hi - base].to_vec();
        base += bytes.len();
        out
    };
    let (to_app, to_peer, resume) = (
        part(&handed.to_app),
        part(&handed.to_peer),
        part(&handed.resume),
    );
    let more = end < base;
    if !first {
        return Record {
            id: handed.id,
            continued: true,
            more,
            to_app,
            to_peer,
            resume,
            ..Record::default()
        };
    }
    Record {
        id: handed.id,
        continued: false,
        more,
        pod: handed.pod.clone(),
        direction: match handed.direction {
            Direction::Outbound => WireDirection::Outbound,
            Direction::Inbound => WireDirection::Inbound,
        } as i32,
        original_dst: handed.original_dst.to_string(),
        peer: handed.peer.to_string(),
        peer_identity: handed.peer_identity.clone(),
        to_app,
        to_peer,
        resume,
        peer_socket,
    }
}

/// The receiver's side of batching: checks each batch against the bounds and the fds that came with it,
/// and returns the connections it completes.
#[derive(Debug)]
pub(super) struct Assembler {
    /// Connections the sender announced.
    announced: u64,
    /// Connections completed so far.
    completed: u64,
    /// The next batch's expected sequence number.
    seq: u64,
    /// A connection whose records continue in a later packet.
    partial: Option<(Handed, Fds)>,
    /// The version the sender said: 1 refuses a second fd.
    version: u32,
}

impl Assembler {
    /// For a hand-over of `announced` connections in protocol `version`; refuses more than
    /// [`MAX_CONNECTIONS`].
    pub(super) fn new(announced: u64, version: u32) -> Result<Assembler, Error> {
        if announced > MAX_CONNECTIONS {
            return Err(Error::TooMany {
                announced,
                max: MAX_CONNECTIONS,
            });
        }
        Ok(Assembler {
            announced,
            completed: 0,
            seq: 0,
            partial: None,
            version,
        })
    }

    /// Applies one batch and its fds: the connections whose last record it holds. On error nothing of the
    /// batch is kept (its fds are closed), nor the partial connection.
    pub(super) fn apply(
        &mut self,
        batch: Batch,
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<(Handed, Fds)>, Error> {
        if batch.seq != self.seq {
            return Err(Error::Malformed(format!(
                "batch {} out of order: expected batch {}",
                batch.seq, self.seq
            )));
        }
        if batch.records.is_empty() {
            return Err(Error::Malformed(format!("batch {} is empty", batch.seq)));
        }
        if self.version == OLDEST_VERSION {
            if let Some(r) = batch.records.iter().find(|r| r.peer_socket) {
                return Err(Error::Malformed(format!(
                    "connection {}: a second fd in a version {OLDEST_VERSION} hand-over",
                    r.id
                )));
            }
        }
        let expected: usize = batch
            .records
            .iter()
            .filter(|r| !r.continued)
            .map(|r| 1 + usize::from(r.peer_socket))
            .sum();
        if expected != fds.len() {
            return Err(Error::FdCount {
                expected,
                got: fds.len(),
            });
        }
        let mut fds = fds.into_iter();
        let mut done = Vec::new();
        for record in batch.records {
            let (mut handed, fd) = match (record.continued, self.partial.take()) {
                (false, None) => {
                    let mut next = || {
                        fds.next()
                            .expect("the starting records' fds, counted above")
                    };
                    let app = next();
                    let peer = record.peer_socket.then(next);
                    (start(&record)?, Fds { app, peer })
                }
                (true, Some(partial)) if partial.0.id == record.id => {
                    continuation(&record)?;
                    partial
                }
                (false, Some(partial)) => {
                    return Err(Error::Malformed(format!(
                        "connection {} starts before connection {} ends",
                        record.id, partial.0.id
                    )))
                }
                (true, _) => {
                    return Err(Error::Malformed(format!(
                        "record continues connection {}, which is not the one being received",
                        record.id
                    )))
                }
            };
            append(
                handed.id,
                "to_app",
                &mut handed.to_app,
                record.to_app,
                MAX_BUFFERED,
            )?;
            append(
                handed.id,
                "to_peer",
                &mut handed.to_peer,
                record.to_peer,
                MAX_BUFFERED,
            )?;
            append(
                handed.id,
                "resume",
                &mut handed.resume,
                record.resume,
                MAX_RESUME,
            )?;
            if record.more {
                self.partial = Some((handed, fd));
                continue;
            }
            self.completed += 1;
            if self.completed > self.announced {
                return Err(Error::Malformed(format!(
                    "more connections than the {} announced",
                    self.announced
                )));
            }
            done.push((handed, fd));
        }
        self.seq += 1;
        Ok(done)
    }

    /// The sender said `End`: every announced connection must be complete.
    pub(super) fn finish(&self) -> Result<(), Error> {
        if let Some((handed, _)) = &self.partial {
            return Err(Error::Malformed(format!(
                "ended in the middle of connection {}",
                handed.id
            )));
        }
        if self.completed != self.announced {
            return Err(Error::Malformed(format!(
                "ended after {} of the {} connections announced",
                self.completed, self.announced
            )));
        }
        Ok(())
    }
}

/// The connection a first record starts (its bytes appended by the caller).
fn start(record: &Record) -> Result<Handed, Error> {
    let id = record.id;
    for (field, text) in [
        ("pod", &record.pod),
        ("peer_identity", &record.peer_identity),
    ] {
        if text.len() > MAX_NAME {
            return Err(Error::TooLarge {
                id,
                field,
                len: text.len(),
                max: MAX_NAME,
            });
        }
    }
    let direction = match WireDirection::try_from(record.direction) {
        Ok(WireDirection::Outbound) => Direction::Outbound,
        Ok(WireDirection::Inbound) => Direction::Inbound,
        _ => {
            return Err(Error::Malformed(format!(
                "connection {id}: direction {} unknown",
                record.direction
            )))
        }
    };
    let address = |field: &str, text: &str| -> Result<SocketAddr, Error> {
        if text.len() > MAX_ADDRESS {
            return Err(Error::Malformed(format!(
                "connection {id}: {field} longer than {MAX_ADDRESS} bytes"
            )));
        }
        text.parse().map_err(|_| {
            Error::Malformed(format!("connection {id}: {field} {text:?} is not ip:port"))
        })
    };
    Ok(Handed {
        id,
        pod: record.pod.clone(),
        direction,
        original_dst: address("original_dst", &record.original_dst)?,
        peer: address("peer", &record.peer)?,
        peer_identity: record.peer_identity.clone(),
        to_app: Vec::new(),
        to_peer: Vec::new(),
        resume: Vec::new(),
    })
}

/// A continuation carries bytes only.
fn continuation(record: &Record) -> Result<(), Error> {
    let has_metadata = !record.pod.is_empty()
        || record.direction != 0
        || !record.original_dst.is_empty()
        || !record.peer.is_empty()
        || !record.peer_identity.is_empty()
        || record.peer_socket;
    if has_metadata {
        return Err(Error::Malformed(format!(
            "continuation of connection {} carries metadata",
            record.id
        )));
    }
    Ok(())
}

/// Appends `more` to a connection's `field`, refusing to grow it past `max`.
fn append(
    id: u64,
    field: &'static str,
    to: &mut Vec<u8>,
    more: Vec<u8>,
    max: usize,
) -> Result<(), Error> {
    let len = to.len() + more.len();
    if len > max {
        return Err(Error::TooLarge {
            id,
            field,
            len,
            max,
        });
    }
    if to.is_empty() {
        *to = more;
    } else {
        to.extend_from_slice(&more);
    }
    Ok(())
}
