//! Resumable HBONE streams (issue 17): what lets one end of a CONNECT stream move to another process
//! without the application on either side seeing a byte lost, duplicated or reset.
//!
//! Input: the bytes an application writes (to send), the frames the peer sends, the `x-meshnode-resume`
//! header on a CONNECT and its answer. Output: frames to send, the bytes to deliver, acknowledgements, and
//! on a resume the bytes to send again.
//!
//! - **Agreement.** A meshnode client offers a [`Token`] at CONNECT in [`RESUME_HEADER`]; a meshnode server
//!   that takes the offer echoes it in its `200`. Only then is the stream's payload framed. ztunnel ignores
//!   the header and does not echo it, so a stream with a ztunnel peer stays plain bytes, as today.
//! - **Frames** ([`Frame`], [`decode`], [`put_data`], [`put_ack`], [`put_moving`]): `DATA` carries 1 to
//!   [`MAX_DATA`] bytes; `FIN` ends the data after a total (the application closed its side; the stream
//!   itself stays open for acknowledgements) and counts as one more unit, as in TCP; `ACK` the units taken
//!   off the stream so far; `MOVING` says the sender is leaving (with its own count, a last `ACK`), so the
//!   peer expects a re-dial. The HTTP/2 stream ends (END_STREAM) only when both `FIN`s are acknowledged.
//! - **Sending** ([`SendLog`]): each side keeps what it sent until the peer acknowledges it: the copy
//!   reads its application only while less than a window is kept, so at most a window and one read.
//!   **Receiving** ([`RecvCount`]): counts bytes and says when to acknowledge (every quarter window, and
//!   a little after the stream goes quiet).
//! - **Resume.** The HBONE client always re-dials, with the token and the count it received
//!   (`<token>;at=<n>`); the server answers with its own count. Each side then sends again from the other's
//!   count ([`SendLog::resume`]). A count below what was already acknowledged, or above what was sent, is
//!   refused ([`ResumeError`]): the stream then ends as a plain one would.
//!
//! "Received" means taken off the stream, not written to the application: bytes in between travel with the
//! application socket when a process hands its connections over (`upgrade::handover`'s buffered bytes).

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The header carrying the offer, its echo and a resume (a name ztunnel does not know, so ignores).
pub const RESUME_HEADER: &str = "x-meshnode-resume";
/// Most bytes one `DATA` frame carries: the copy loop's largest read.
pub const MAX_DATA: usize = crate::hbone::copy::MAX_READ;
/// Bytes a side keeps for a possible resend by default, bounded per stream (the copy stops reading its
/// app when it is full): the HTTP/2 stream window (4 MiB, as ztunnel's), so the resend window is never
/// what holds a stream back (1 MiB cost 8-10 % of one stream's throughput here). It fills only when the
/// peer's application stops reading; acknowledgements free it every quarter otherwise.
pub const DEFAULT_WINDOW: usize = 4 * 1024 * 1024;

const DATA: u8 = 0;
const ACK: u8 = 1;
const MOVING: u8 = 2;
const FIN: u8 = 3;
/// Type byte and length of a `DATA` frame; type byte and count of the others.
const DATA_HEAD: usize = 1 + 4;
const COUNT_FRAME: usize = 1 + 8;

/// What went wrong with a resumable stream; each ends the stream (as a plain stream would end).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    /// A frame type this version does not know.
    #[error("unknown resumable-stream frame type {0}")]
    UnknownFrame(u8),
    /// A `DATA` frame (or a recorded read) with no bytes or more than [`MAX_DATA`].
    #[error("resumable-stream DATA frame of {0} bytes (1 to {MAX_DATA} allowed)")]
    DataLength(usize),
    /// The peer acknowledged bytes that were never sent.
    #[error("peer acknowledged {acked} bytes but only {sent} were sent")]
    AckBeyondSent {
        /// What the peer claimed.
        acked: u64,
        /// What was sent.
        sent: u64,
    },
    /// The peer's count went back below what it had acknowledged: the bytes in between are gone here.
    #[error("peer's count went back to {now} after acknowledging {before}")]
    AckWentBack {
        /// What the peer had acknowledged.
        before: u64,
        /// What it claims now.
        now: u64,
    },
    /// Bytes recorded while the window was full (the caller must check [`SendLog::room`]).
    #[error("{len} bytes recorded with the resend window full")]
    WindowFull {
        /// Bytes offered.
        len: usize,
    },
    /// An `x-meshnode-resume` value that is not `<32 hex digits>` or `<32 hex digits>;at=<count>`.
    #[error("malformed {RESUME_HEADER} value")]
    BadHeader,
    /// Handed-over stream state that cannot be this version's (see `copy::Progress::import`).
    #[error("handed-over resumable-stream state refused: {0}")]
    BadState(&'static str),
}

/// A stream's name across processes: 128 random bits, chosen by the client at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token([u8; 16]);

impl Token {
    /// A fresh random token.
    pub fn random() -> Token {
        Token(rand::random())
    }

    /// The token's 16 bytes (a hand-over carries them).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// A token from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Token {
        Token(bytes)
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// An `x-meshnode-resume` value: the token alone (offer, echo), or with the sender's received count
/// (resume and its answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeHeader {
    /// The stream.
    pub token: Token,
    /// On a resume: the bytes the sender of the header has taken off the stream.
    pub at: Option<u64>,
}

impl ResumeHeader {
    /// Parses a header value.
    pub fn parse(value: &[u8]) -> Result<ResumeHeader, ResumeError> {
        let text = std::str::from_utf8(value).map_err(|_| ResumeError::BadHeader)?;
        let (token, at) = match text.split_once(';') {
            None => (text, None),
            Some((token, rest)) => {
                let count = rest.strip_prefix("at=").ok_or(ResumeError::BadHeader)?;
                if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ResumeError::BadHeader);
                }
                (
                    token,
                    Some(count.parse().map_err(|_| ResumeError::BadHeader)?),
                )
            }
        };
        if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ResumeError::BadHeader);
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&token[2 * i..2 * i + 2], 16)
                .map_err(|_| ResumeError::BadHeader)?;
        }
        Ok(ResumeHeader {
            token: Token(bytes),
            at,
        })
    }

    /// The header value.
    pub fn to_value(self) -> http::HeaderValue {
        let text = match self.at {
            None => self.token.to_string(),
            Some(at) => format!("{};at={at}", self.token),
        };
        http::HeaderValue::try_from(text)
            .expect("hex digits, a semicolon and decimal digits are a valid value")
    }
}

/// A piece of the frame stream, as [`Decoder`] takes it off one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Payload bytes of a `DATA` frame (a frame's payload may come in several pieces).
    Data(Bytes),
    /// `ACK`.
    Ack(u64),
    /// `MOVING`.
    Moving(u64),
    /// `FIN`.
    Fin(u64),
}

/// Frames off a stream that arrives in chunks (HTTP/2 DATA frames), without assembling payloads: a
/// `DATA` frame's bytes come out as slices of the chunks that carried them, so nothing is copied and
/// nothing waits for the rest of a frame. Only a frame head split between chunks (at most 9 bytes) is
/// kept.
#[derive(Debug, Default)]
pub struct Decoder {
    head: [u8; COUNT_FRAME],
    head_len: usize,
    /// Payload bytes of the current `DATA` frame still to come.
    data_left: usize,
}

impl Decoder {
    /// The next piece off the front of `chunk`; `None` once `chunk` is used up (the decoder keeps what
    /// it needs of a frame it cut).
    pub fn next(&mut self, chunk: &mut Bytes) -> Result<Option<Piece>, ResumeError> {
        loop {
            if self.data_left > 0 {
                if chunk.is_empty() {
                    return Ok(None);
                }
                let n = self.data_left.min(chunk.len());
                self.data_left -= n;
                return Ok(Some(Piece::Data(chunk.split_to(n))));
            }
            let Some(&kind) = self.head[..self.head_len].first().or(chunk.first()) else {
                return Ok(None);
            };
            let need = match kind {
                DATA => DATA_HEAD,
                ACK | MOVING | FIN => COUNT_FRAME,
                other => return Err(ResumeError::UnknownFrame(other)),
            };
            let take = (need - self.head_len).min(chunk.len());
            self.head[self.head_len..self.head_len + take].copy_from_slice(&chunk[..take]);
            chunk.advance(take);
            self.head_len += take;
            if self.head_len < need {
                return Ok(None);
            }
            self.head_len = 0;
            let head = &self.head[1..need];
            if kind == DATA {
                let len = u32::from_be_bytes(head.try_into().expect("four bytes")) as usize;
                if len == 0 || len > MAX_DATA {
                    return Err(ResumeError::DataLength(len));
                }
                self.data_left = len;
                continue;
            }
            let count = u64::from_be_bytes(head.try_into().expect("eight bytes"));
            return Ok(Some(match kind {
                ACK => Piece::Ack(count),
                MOVING => Piece::Moving(count),
                _ => Piece::Fin(count),
            }));
        }
    }

    /// Whether the stream so far ended on a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.data_left == 0
    }
}

/// Appends a `DATA` frame carrying `bytes` (1 to [`MAX_DATA`] of them).
pub fn put_data(dst: &mut BytesMut, bytes: &[u8]) -> Result<(), ResumeError> {
    put_data_head(dst, bytes.len())?;
    dst.extend_from_slice(bytes);
    Ok(())
}

/// Appends the head of a `DATA` frame of `len` bytes (1 to [`MAX_DATA`]); the bytes follow on the wire
/// (sent as a part of their own, without a copy).
pub fn put_data_head(dst: &mut BytesMut, len: usize) -> Result<(), ResumeError> {
    if len == 0 || len > MAX_DATA {
        return Err(ResumeError::DataLength(len));
    }
    dst.reserve(DATA_HEAD);
    dst.put_u8(DATA);
    dst.put_u32(len as u32);
    Ok(())
}

/// Appends an `ACK` frame for `count` bytes taken off the stream.
pub fn put_ack(dst: &mut BytesMut, count: u64) {
    dst.put_u8(ACK);
    dst.put_u64(count);
}

/// Appends a `FIN` frame: no data after `total` bytes.
pub fn put_fin(dst: &mut BytesMut, total: u64) {
    dst.put_u8(FIN);
    dst.put_u64(total);
}

/// Appends a `MOVING` frame with the leaving side's count.
pub fn put_moving(dst: &mut BytesMut, count: u64) {
    dst.put_u8(MOVING);
    dst.put_u64(count);
}

/// The bytes sent and not yet acknowledged, kept for a resend after a move, and whether the `FIN` went.
/// The reads themselves are kept (shared with the frames that carried them), not a copy.
#[derive(Debug)]
pub struct SendLog {
    /// Bytes the peer acknowledged: the stream offset of `kept`'s first byte.
    base: u64,
    /// The reads not yet acknowledged, oldest first (the first possibly in part).
    kept: VecDeque<Bytes>,
    /// Their length in all.
    kept_len: usize,
    window: usize,
    fin: bool,
    fin_acked: bool,
}

impl SendLog {
    /// An empty log keeping at most `window` bytes.
    pub fn new(window: usize) -> SendLog {
        SendLog {
            base: 0,
            kept: VecDeque::new(),
            kept_len: 0,
            window,
            fin: false,
            fin_acked: false,
        }
    }

    /// Bytes sent since the stream began (the `FIN` not counted).
    pub fn sent(&self) -> u64 {
        self.base + self.kept_len as u64
    }

    /// Units the peer has acknowledged: bytes, and one for the `FIN`.
    pub fn acked(&self) -> u64 {
        self.base + u64::from(self.fin_acked)
    }

    /// Bytes the window has left: another read (of up to [`MAX_DATA`]) may be sent while this is not 0.
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.kept_len)
    }

    /// Keeps `bytes` (one read, at most [`MAX_DATA`]), just sent, until they are acknowledged.
    pub fn record(&mut self, bytes: Bytes) -> Result<(), ResumeError> {
        if bytes.len() > MAX_DATA {
            return Err(ResumeError::DataLength(bytes.len()));
        }
        if self.room() == 0 {
            return Err(ResumeError::WindowFull { len: bytes.len() });
        }
        debug_assert!(!self.fin, "no data after the FIN");
        if !bytes.is_empty() {
            self.kept_len += bytes.len();
            self.kept.push_back(bytes);
        }
        Ok(())
    }

    /// The `FIN` went, after [`SendLog::sent`] bytes.
    pub fn finish(&mut self) {
        self.fin = true;
    }

    /// Whether the `FIN` went.
    pub fn finished(&self) -> bool {
        self.fin
    }

    /// The peer acknowledged the `FIN` (and so every byte before it).
    pub fn done(&self) -> bool {
        self.fin_acked
    }

    /// The peer has taken `count` units in all: forget those bytes.
    pub fn ack(&mut self, count: u64) -> Result<(), ResumeError> {
        let limit = self.sent() + u64::from(self.fin);
        if count > limit {
            return Err(ResumeError::AckBeyondSent {
                acked: count,
                sent: limit,
            });
        }
        if count < self.acked() {
            return Err(ResumeError::AckWentBack {
                before: self.acked(),
                now: count,
            });
        }
        let data = count.min(self.sent());
        let mut drop = (data - self.base) as usize;
        self.kept_len -= drop;
        while drop > 0 {
            let front = self
                .kept
                .front_mut()
                .expect("kept_len counts what kept holds");
            if front.len() <= drop {
                drop -= front.len();
                self.kept.pop_front();
            } else {
                front.advance(drop);
                drop = 0;
            }
        }
        if self.kept.is_empty() {
            // Nothing kept: give the queue's memory back too (an idle stream holds nothing).
            self.kept = VecDeque::new();
        }
        self.base = data;
        self.fin_acked = self.fin && count == limit;
        Ok(())
    }

    /// The bytes sent and not acknowledged, oldest first, as the reads that sent them.
    pub fn unacked(&self) -> impl Iterator<Item = &Bytes> {
        self.kept.iter()
    }

    /// The bytes sent and not acknowledged, in one copy (for a hand-over).
    pub fn unacked_bytes(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.kept_len);
        self.kept.iter().for_each(|b| all.extend_from_slice(b));
        all
    }

    /// The window this log was made with.
    pub fn window(&self) -> usize {
        self.window
    }

    /// A log as another process left it: `base` bytes acknowledged, then `unacked`; whether the `FIN`
    /// went and was acknowledged.
    pub fn restore(
        window: usize,
        base: u64,
        unacked: &[u8],
        fin: bool,
        fin_acked: bool,
    ) -> Result<SendLog, ResumeError> {
        if window == 0 || unacked.len() > window + MAX_DATA {
            return Err(ResumeError::BadState(
                "more unacknowledged bytes than a window and a read",
            ));
        }
        if fin_acked && (!fin || !unacked.is_empty()) {
            return Err(ResumeError::BadState(
                "FIN acknowledged before it went or before its bytes",
            ));
        }
        if base.checked_add(unacked.len() as u64 + 1).is_none() {
            return Err(ResumeError::BadState("stream offset overflows"));
        }
        let all = Bytes::copy_from_slice(unacked);
        // In parts a DATA frame can carry.
        let kept = (0..all.len())
            .step_by(MAX_DATA)
            .map(|at| all.slice(at..all.len().min(at + MAX_DATA)))
            .collect();
        Ok(SendLog {
            base,
            kept,
            kept_len: unacked.len(),
            window,
            fin,
            fin_acked,
        })
    }

    /// After a move: the peer says it has `count` units in all. What it lacks ([`SendLog::unacked`]) goes
    /// again, in order, before anything new (then the `FIN` again if it went and is not acknowledged).
    pub fn resume(&mut self, count: u64) -> Result<(), ResumeError> {
        self.ack(count)
    }
}

/// The receiving side's count, and when to acknowledge it.
#[derive(Debug)]
pub struct RecvCount {
    received: u64,
    acked: u64,
    every: u64,
}

impl RecvCount {
    /// Acknowledges every quarter of the sender's `window`, so the sender never waits on a full window
    /// while acknowledgements are on their way.
    pub fn new(window: usize) -> RecvCount {
        RecvCount {
            received: 0,
            acked: 0,
            every: (window as u64 / 4).max(1),
        }
    }

    /// Bytes taken off the stream in all.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// `n` more bytes taken off the stream.
    pub fn on_data(&mut self, n: usize) {
        self.received += n as u64;
    }

    /// The peer's `FIN` taken off the stream (one unit).
    pub fn on_fin(&mut self) {
        self.received += 1;
    }

    /// The count to acknowledge now, if a quarter window has come since the last acknowledgement.
    pub fn ack_due(&mut self) -> Option<u64> {
        (self.received - self.acked >= self.every).then(|| self.flush())
    }

    /// Whether something came since the last acknowledgement.
    pub fn unacked(&self) -> bool {
        self.received > self.acked
    }

    /// The count to acknowledge when the stream goes quiet, if anything came since the last one.
    pub fn ack_idle(&mut self) -> Option<u64> {
        (self.received > self.acked).then(|| self.flush())
    }

    /// A count as another process left it (`received` units taken), everything counted as acknowledged:
    /// the resume exchanges counts anyway.
    pub fn restore(window: usize, received: u64) -> RecvCount {
        let mut count = RecvCount::new(window);
        count.received = received;
        count.acked = received;
        count
    }

    fn flush(&mut self) -> u64 {
        self.acked = self.received;
        self.received
    }
}

pub mod copy;
pub mod parking;
pub mod piped;
pub mod redial;

#[cfg(test)]
mod tests;
