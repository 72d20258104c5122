//! The resumable copy: bytes between an application's socket and an HBONE stream whose payload is framed
//! (see `super`), both directions at once, stopping on request with everything the next stream needs.
//!
//! Input: the socket's halves, the stream's halves, the connection's [`Progress`] (which outlives the
//! stream), and a pause signal. Output: an [`Outcome`]:
//! - `Done`: both applications closed their sides and every byte and both `FIN`s were acknowledged; the
//!   stream is ended (END_STREAM both ways).
//! - `Paused`: the pause signal came; a `MOVING` went (or, when a frame was part-way out, the stream was
//!   dropped, which the peer reads the same way).
//! - `PeerLeft`: the peer's `MOVING`, or its stream ended or was reset before both sides were done (a
//!   reset with [`FAILED`] is an error instead: the peer's copy failed, nothing will resume).
//!
//! After `Paused` or `PeerLeft` the [`Progress`] holds the bytes not acknowledged, the count received and
//! any bytes taken off the stream but not yet written to the application; [`Progress::resume`] with the
//! peer's count (exchanged at the re-dial) and another [`run`] on a new stream carry on exactly there.
//!
//! Back-pressure: the sending half reads its application only while the window has room; the receiving
//! half reads the stream only after writing what it took to its application. Acknowledgements go every
//! quarter window, and [`ACK_DELAY`] after the stream went quiet (once per delay, not per message, for
//! request/response traffic), so an idle connection soon keeps nothing for a resend.
//!
//! Memory while idle: no read buffer (reads go through `hbone::copy`'s reader, which drops its buffer
//! when the socket is drained), no frame buffer, and nothing kept once acknowledged.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};

use super::{
    put_ack, put_data, put_data_head, put_fin, put_moving, Decoder, Piece, RecvCount, ResumeError,
    SendLog, MAX_DATA,
};
use crate::hbone::copy::{h2_io, Reader, Transferred};

/// How long after the stream goes quiet what came is acknowledged.
pub const ACK_DELAY: Duration = Duration::from_millis(20);

/// A resumable connection's state across its streams.
#[derive(Debug)]
pub struct Progress {
    log: SendLog,
    count: RecvCount,
    /// Taken off the stream, not yet written to the application (a hand-over carries these).
    unwritten: Bytes,
    /// The peer's `FIN` was taken and the socket's write side shut.
    fin_received: bool,
    /// Send the log (and the `FIN`) again before anything new: set by [`Progress::resume`].
    resend: bool,
}

/// A paused connection's state as [`Progress::export`] gives it.
#[derive(Debug)]
pub struct Exported<'a> {
    /// Sent, not acknowledged: sent again after the resume (copied into one buffer).
    pub unacked: Vec<u8>,
    /// Taken off the stream, not yet written to the application: written first.
    pub unwritten: &'a [u8],
    /// Counts, window and flags (versioned, fixed size).
    pub state: [u8; STATE_LEN],
}

/// Bytes of an exported state: version, flags, window, bytes acknowledged by the peer, units received.
pub const STATE_LEN: usize = 1 + 1 + 4 + 8 + 8;
const STATE_VERSION: u8 = 1;
/// Largest window an imported state may name.
const MAX_WINDOW: usize = 16 << 20;

/// The reset that ends a resumable stream for good (its copy failed, or its server refused it): the peer
/// does not wait for a resume. Any other reset, like a connection lost, is resumable.
pub const FAILED: Reason = Reason::CONNECT_ERROR;

/// How a [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed, everything acknowledged: the connection is over.
    Done(Transferred),
    /// Paused on request: resume on a new stream.
    Paused,
    /// The peer's stream went away (reset, connection gone): resume on a new stream.
    PeerLeft,
    /// The peer said it is moving (`MOVING`): resume on a new stream; its new process may take a moment
    /// to have the stream.
    PeerMoving,
}

impl Progress {
    /// A new connection's state; the peer may have `window` bytes unacknowledged from us at a time.
    pub fn new(window: usize) -> Progress {
        Progress {
            log: SendLog::new(window),
            count: RecvCount::new(window),
            unwritten: Bytes::new(),
            fin_received: false,
            resend: false,
        }
    }

    /// The units taken off the stream (bytes, and one for the peer's `FIN`): what a resume tells the peer.
    pub fn received(&self) -> u64 {
        self.count.received()
    }

    /// Bytes taken off the stream and not yet written to the application.
    pub fn unwritten(&self) -> &[u8] {
        &self.unwritten
    }

    /// Before running on a new stream: the peer has `peer_count` units; what it lacks goes first.
    pub fn resume(&mut self, peer_count: u64) -> Result<(), ResumeError> {
        self.log.resume(peer_count)?;
        self.resend = true;
        Ok(())
    }

    /// The state of a paused connection, for another process (`upgrade::handover` carries the parts:
    /// `unacked` as the bytes to the peer, `unwritten` as the bytes to the application, `state` as the
    /// resumption blob).
    pub fn export(&self) -> Exported<'_> {
        let mut state = [0u8; STATE_LEN];
        state[0] = STATE_VERSION;
        state[1] = u8::from(self.log.finished())
            | u8::from(self.log.done()) << 1
            | u8::from(self.fin_received) << 2;
        state[2..6].copy_from_slice(&(self.log.window() as u32).to_be_bytes());
        let unacked = self.log.unacked_bytes();
        let base = self.log.sent() - unacked.len() as u64;
        state[6..14].copy_from_slice(&base.to_be_bytes());
        state[14..22].copy_from_slice(&self.count.received().to_be_bytes());
        Exported {
            unacked,
            unwritten: &self.unwritten,
            state,
        }
    }

    /// A connection's state from [`Progress::export`]'s parts, as another process handed them over;
    /// refused when they cannot be (a version, lengths or flags out of bounds).
    pub fn import(unacked: &[u8], unwritten: &[u8], state: &[u8]) -> Result<Progress, ResumeError> {
        let state: &[u8; STATE_LEN] = state
            .try_into()
            .map_err(|_| ResumeError::BadState("state of another length"))?;
        if state[0] != STATE_VERSION {
            return Err(ResumeError::BadState("state of another version"));
        }
        let flags = state[1];
        if flags & !0b111 != 0 {
            return Err(ResumeError::BadState("unknown flags"));
        }
        let window = u32::from_be_bytes(state[2..6].try_into().expect("4 bytes")) as usize;
        if window > MAX_WINDOW {
            return Err(ResumeError::BadState(
                "window larger than this version allows",
            ));
        }
        let base = u64::from_be_bytes(state[6..14].try_into().expect("8 bytes"));
        let received = u64::from_be_bytes(state[14..22].try_into().expect("8 bytes"));
        let fin_received = flags & 0b100 != 0;
        if unwritten.len() > MAX_DATA || received < unwritten.len() as u64 + u64::from(fin_received)
        {
            return Err(ResumeError::BadState(
                "more unwritten bytes than were received",
            ));
        }
        Ok(Progress {
            log: SendLog::restore(window, base, unacked, flags & 1 != 0, flags & 0b10 != 0)?,
            count: RecvCount::restore(window, received),
            unwritten: Bytes::copy_from_slice(unwritten),
            fin_received,
            resend: false,
        })
    }

    fn transferred(&self) -> Transferred {
        Transferred {
            tcp_to_hbone: self.log.sent(),
            hbone_to_tcp: self.count.received()
                - u64::from(self.fin_received)
                - self.unwritten.len() as u64,
        }
    }
}

/// What the two halves tell each other.
#[derive(Default)]
struct Shared {
    /// The highest count the peer acknowledged (`ACK`, `MOVING`).
    peer_acked: AtomicU64,
    /// The count the receiving half wants acknowledged.
    ack_owed: AtomicU64,
    /// The units taken off the stream so far (for `MOVING`).
    received: AtomicU64,
    /// The peer's `FIN` was taken and the socket's write side shut.
    recv_finished: AtomicBool,
    /// The peer left: the sending half stops.
    peer_left: AtomicBool,
    /// Wakes the sending half when any of the above changed.
    wake: Notify,
}

impl Shared {
    fn owe(&self, count: u64) {
        self.ack_owed.fetch_max(count, Ordering::AcqRel);
        self.wake.notify_one();
    }
}

#[derive(Debug, PartialEq, Eq)]
enum SendEnd {
    Done,
    Paused,
    Stopped,
}

#[derive(Debug, PartialEq, Eq)]
enum RecvEnd {
    Ended,
    Paused,
    PeerLeft,
    PeerMoving,
}

/// Runs the copy on one stream until it is done, paused or the peer left (see the module header). An
/// error (the socket's, the stream's, or a malformed frame) resets the stream and is returned; the
/// connection then ends as a plain one would.
pub async fn run<R, W>(
    app_read: &mut R,
    app_write: &mut W,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
    progress: &mut Progress,
    pause: &watch::Receiver<bool>,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let shared = Shared::default();
    shared
        .peer_acked
        .store(progress.log.acked(), Ordering::Relaxed);
    let Progress {
        log,
        count,
        unwritten,
        fin_received,
        resend,
    } = progress;
    shared.recv_finished.store(*fin_received, Ordering::Relaxed);
    shared.received.store(count.received(), Ordering::Relaxed);
    let (mut pause_up, mut pause_down) = (pause.clone(), pause.clone());
    let up = send_half(app_read, send, log, resend, &shared, &mut pause_up);
    let down = recv_half(
        recv,
        app_write,
        count,
        unwritten,
        fin_received,
        &shared,
        &mut pause_down,
    );
    let (up, down) = match tokio::try_join!(up, down) {
        Ok(ends) => ends,
        Err(e) => {
            // Not CANCEL: the peer must not wait for a resume that will not come.
            send.send_reset(FAILED);
            return Err(e);
        }
    };
    Ok(match (up, down) {
        (SendEnd::Done, RecvEnd::Ended) => Outcome::Done(progress.transferred()),
        (SendEnd::Paused, _) | (_, RecvEnd::Paused) => Outcome::Paused,
        (_, RecvEnd::PeerMoving) => Outcome::PeerMoving,
        _ => Outcome::PeerLeft,
    })
}

/// Resolves once `pause` reads true; never, if its sender is gone.
pub async fn paused(pause: &mut watch::Receiver<bool>) {
    if pause.wait_for(|p| *p).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn protocol(e: ResumeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// How far a buffer of frames got out.
enum Sent {
    All,
    /// Paused before any of it was handed to the stream: the stream is at a frame boundary.
    Nothing,
    /// Paused part-way through: the stream is mid-frame.
    Partly,
}

/// Hands `frames`, then `more`, to the stream as its flow control allows, watching for the pause.
async fn send_frames(
    send: &mut SendStream<Bytes>,
    frames: Bytes,
    more: Bytes,
    pause: &mut watch::Receiver<bool>,
) -> io::Result<Sent> {
    let whole = frames.len() + more.len();
    let mut left = whole;
    for mut frames in [frames, more] {
        while !frames.is_empty() {
            send.reserve_capacity(frames.len());
            let cap = loop {
                let cap = send.capacity();
                if cap > 0 {
                    break cap;
                }
                tokio::select! {
                    biased;
                    _ = paused(pause) => {
                        return Ok(if left == whole { Sent::Nothing } else { Sent::Partly });
                    }
                    got = std::future::poll_fn(|cx| send.poll_capacity(cx)) => match got {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(h2_io(e)),
                        None => return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "HBONE stream closed by peer",
                        )),
                    },
                }
            };
            let part = frames.split_to(cap.min(frames.len()));
            left -= part.len();
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
    Ok(Sent::All)
}

/// Leaves the stream: `MOVING` with our count and END_STREAM when the stream is at a frame boundary
/// (otherwise the caller's dropping the stream says the same).
fn leave(send: &mut SendStream<Bytes>, at_boundary: bool, shared: &Shared) {
    if at_boundary {
        let mut moving = BytesMut::new();
        put_moving(&mut moving, shared.received.load(Ordering::Acquire));
        let _ = send.send_data(moving.freeze(), true);
    }
}

async fn send_half<R: AsyncRead + Unpin>(
    app: &mut R,
    send: &mut SendStream<Bytes>,
    log: &mut SendLog,
    resend: &mut bool,
    shared: &Shared,
    pause: &mut watch::Receiver<bool>,
) -> io::Result<SendEnd> {
    // Frames to send, then the bytes of a DATA frame whose head ends `out` (sent without a copy).
    let mut out = BytesMut::new();
    let mut data = Bytes::new();
    let mut acked_sent = 0u64;
    let mut reader = Reader::default();
    if std::mem::take(resend) {
        for part in log.unacked() {
            put_data(&mut out, part).map_err(protocol)?;
        }
        if log.finished() && !log.done() {
            put_fin(&mut out, log.sent());
        }
    }
    loop {
        if !out.is_empty() {
            // Taken whole, so an idle connection keeps no frame buffer.
            let frames = std::mem::take(&mut out).freeze();
            let data = std::mem::take(&mut data);
            // A stream that fails is the receiving half's to report (as the peer leaving).
            let Ok(sent) = send_frames(send, frames, data, pause).await else {
                return Ok(SendEnd::Stopped);
            };
            match sent {
                Sent::All => {}
                Sent::Nothing => {
                    leave(send, true, shared);
                    return Ok(SendEnd::Paused);
                }
                Sent::Partly => return Ok(SendEnd::Paused),
            }
        }
        if *pause.borrow() {
            leave(send, true, shared);
            return Ok(SendEnd::Paused);
        }
        if shared.peer_left.load(Ordering::Acquire) {
            return Ok(SendEnd::Stopped);
        }
        let peer = shared.peer_acked.load(Ordering::Acquire);
        if peer > log.acked() {
            log.ack(peer).map_err(protocol)?;
        }
        let owed = shared.ack_owed.load(Ordering::Acquire);
        if owed > acked_sent {
            put_ack(&mut out, owed);
            acked_sent = owed;
            continue;
        }
        if log.done() && shared.recv_finished.load(Ordering::Acquire) {
            if send.send_data(Bytes::new(), true).is_err() {
                return Ok(SendEnd::Stopped);
            }
            return Ok(SendEnd::Done);
        }
        let can_read = !log.finished() && log.room() > 0;
        tokio::select! {
            biased;
            _ = paused(pause) => {}
            _ = shared.wake.notified() => {}
            got = std::future::poll_fn(|cx| reader.poll_chunk(cx, app)), if can_read => {
                let chunk = got?;
                if chunk.is_empty() {
                    log.finish();
                    put_fin(&mut out, log.sent());
                } else {
                    log.record(chunk.clone()).map_err(protocol)?;
                    put_data_head(&mut out, chunk.len()).map_err(protocol)?;
                    data = chunk;
                }
            }
        }
    }
}

/// Writes `pending` out, watching for the pause; `false` when paused first (the rest stays in `pending`).
async fn write_out<W: AsyncWrite + Unpin>(
    app: &mut W,
    pending: &mut Bytes,
    pause: &mut watch::Receiver<bool>,
) -> io::Result<bool> {
    while !pending.is_empty() {
        tokio::select! {
            biased;
            _ = paused(pause) => return Ok(false),
            n = app.write(pending) => {
                let n = n?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                pending.advance(n);
            }
        }
    }
    // Written: let go of the buffer it pointed into.
    *pending = Bytes::new();
    Ok(true)
}

async fn recv_half<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    app: &mut W,
    count: &mut RecvCount,
    unwritten: &mut Bytes,
    fin_received: &mut bool,
    shared: &Shared,
    pause: &mut watch::Receiver<bool>,
) -> io::Result<RecvEnd> {
    let left = |end| {
        shared.peer_left.store(true, Ordering::Release);
        shared.wake.notify_one();
        Ok(end)
    };
    // Frames come apart as the stream's chunks arrive: DATA payloads go to the application as slices
    // of those chunks, never copied or assembled.
    let mut decoder = Decoder::default();
    let mut chunk = Bytes::new();
    // Armed when something came and was not acknowledged yet (only then: it is a timer entry).
    let mut ack_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    if !write_out(app, unwritten, pause).await? {
        return Ok(RecvEnd::Paused);
    }
    loop {
        while let Some(piece) = decoder.next(&mut chunk).map_err(protocol)? {
            match piece {
                Piece::Data(bytes) => {
                    if *fin_received {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "resumable stream: data after FIN",
                        ));
                    }
                    count.on_data(bytes.len());
                    shared.received.store(count.received(), Ordering::Release);
                    *unwritten = bytes;
                    if !write_out(app, unwritten, pause).await? {
                        return Ok(RecvEnd::Paused);
                    }
                }
                Piece::Ack(n) => {
                    shared.peer_acked.fetch_max(n, Ordering::AcqRel);
                    shared.wake.notify_one();
                }
                Piece::Fin(total) => {
                    if *fin_received || total != count.received() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "resumable stream: FIN after {total} bytes, {} received",
                                count.received()
                            ),
                        ));
                    }
                    app.shutdown().await?;
                    count.on_fin();
                    shared.received.store(count.received(), Ordering::Release);
                    *fin_received = true;
                    if let Some(n) = count.ack_idle() {
                        shared.owe(n);
                    }
                    shared.recv_finished.store(true, Ordering::Release);
                    shared.wake.notify_one();
                }
                Piece::Moving(n) => {
                    shared.peer_acked.fetch_max(n, Ordering::AcqRel);
                    return left(RecvEnd::PeerMoving);
                }
            }
            if let Some(n) = count.ack_due() {
                shared.owe(n);
            }
        }
        // Used up: let go of the buffer the chunk came in.
        chunk = Bytes::new();
        if !count.unacked() {
            ack_timer = None;
        } else if ack_timer.is_none() {
            ack_timer = Some(Box::pin(tokio::time::sleep(ACK_DELAY)));
        }
        let next = tokio::select! {
            biased;
            _ = paused(pause) => return Ok(RecvEnd::Paused),
            _ = async { ack_timer.as_mut().expect("armed").await }, if ack_timer.is_some() => {
                ack_timer = None;
                if let Some(n) = count.ack_idle() {
                    shared.owe(n);
                }
                continue;
            }
            next = recv.data() => next,
        };
        match next {
            Some(Ok(data)) => {
                let _ = recv.flow_control().release_capacity(data.len());
                chunk = data;
            }
            // The peer's copy failed, or it refused the stream: over, as a plain stream's reset is.
            Some(Err(e)) if e.reason() == Some(FAILED) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "resumable stream: the peer ended it with an error",
                ))
            }
            // Any other reset, or the connection under the stream gone (its process left):
            // resumable, and the caller bounds the wait for the resume.
            Some(Err(_)) => return left(RecvEnd::PeerLeft),
            // The peer ends its side only when it is done (its FIN and ours acknowledged).
            None if *fin_received && decoder.at_boundary() => return Ok(RecvEnd::Ended),
            None => return left(RecvEnd::PeerLeft),
        }
    }
}

#[cfg(test)]
mod tests;
