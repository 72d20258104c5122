//! The old process's side: connect, hello, then one batch at a time until every connection is taken.
//!
//! Input: the receiver's path and the connections. Output: a [`SendReport`]. The connections wait in a
//! queue; an acknowledged batch pops the connections it completed off its front (closing our fds at once,
//! so the two processes together hold each socket about once), and whatever is still queued when the
//! hand-over ends, well or not, is `kept`.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::zds::packet::SeqpacketConn;

use super::wire::{Body, End, Hello, Packer, Reason};
use super::{
    read_with_fds, unexpected, with_send_buffer, write, Error, Fds, Handed, SendReport,
    OLDEST_VERSION, PROTOCOL_VERSION,
};

/// The receiver's messages are small (a hello, an ack, a reason of at most 512 bytes).
const REPLY_BUFFER: usize = 1024;

/// How long to retry connecting while the receiver's accept queue is full.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// The hand-over's state: what is still ours, and what was taken.
struct Sending {
    queue: VecDeque<(Handed, Fds)>,
    taken: Vec<u64>,
    packets: usize,
}

/// [`super::send`], with its deadline as a parameter (tests shorten it).
pub(super) async fn send(
    path: &Path,
    conns: Vec<(Handed, Fds)>,
    io_timeout: Duration,
) -> SendReport {
    let connected = match conns.iter().try_for_each(|(handed, _)| handed.check()) {
        Ok(()) => connect(path, io_timeout).await,
        Err(e) => Err(e),
    };
    match connected {
        Ok(conn) => send_on(conn, path, conns, io_timeout).await,
        Err(e) => SendReport {
            taken: Vec::new(),
            kept: conns,
            packets: 0,
            error: Some(e),
        },
    }
}

/// Hands `conns` over on a connected socket; if the receiver at `path` turns out to speak version 1 only,
/// hands it the connections with one fd on a second connection and keeps the plain ones.
pub(super) async fn send_on(
    conn: SeqpacketConn,
    path: &Path,
    conns: Vec<(Handed, Fds)>,
    io_timeout: Duration,
) -> SendReport {
    let first = send_once(conn, conns, io_timeout).await;
    let older = matches!(
        first.error,
        Some(Error::Version {
            ours: PROTOCOL_VERSION,
            theirs: OLDEST_VERSION
        })
    );
    if !older || first.packets > 0 {
        return first;
    }
    // Refused at the hello: nothing moved, every connection is in `kept`, in the order given.
    let (plain, single): (Vec<_>, Vec<_>) = first
        .kept
        .into_iter()
        .enumerate()
        .partition(|(_, (_, fds))| fds.peer.is_some());
    if single.is_empty() {
        return SendReport {
            kept: plain.into_iter().map(|(_, c)| c).collect(),
            ..first
        };
    }
    let positions: Vec<(usize, u64)> = single.iter().map(|(i, (h, _))| (*i, h.id)).collect();
    let single: Vec<(Handed, Fds)> = single.into_iter().map(|(_, c)| c).collect();
    let second = match connect(path, io_timeout).await {
        Ok(conn) => send_once(conn, single, io_timeout).await,
        Err(e) => SendReport {
            taken: Vec::new(),
            kept: single,
            packets: 0,
            error: Some(e),
        },
    };
    // What the second attempt kept is a subsequence of `single`: back to the order given.
    let mut at = positions.iter();
    let mut kept: Vec<(usize, (Handed, Fds))> = second
        .kept
        .into_iter()
        .map(|c| {
            let i = at
                .find(|(_, id)| *id == c.0.id)
                .map_or(usize::MAX, |(i, _)| *i);
            (i, c)
        })
        .chain(plain)
        .collect();
    kept.sort_by_key(|(i, _)| *i);
    SendReport {
        taken: second.taken,
        kept: kept.into_iter().map(|(_, c)| c).collect(),
        packets: second.packets,
        // The version refusal says why the plain connections stayed, when nothing else went wrong.
        error: second.error.or(first.error),
    }
}

/// Hands `conns` over on a connected socket, once.
async fn send_once(
    conn: SeqpacketConn,
    conns: Vec<(Handed, Fds)>,
    io_timeout: Duration,
) -> SendReport {
    let mut sending = Sending {
        taken: Vec::with_capacity(conns.len()),
        queue: conns.into(),
        packets: 0,
    };
    let error = run(conn, &mut sending, io_timeout).await.err();
    SendReport {
        taken: sending.taken,
        kept: sending.queue.into(),
        packets: sending.packets,
        error,
    }
}

async fn run(conn: SeqpacketConn, sending: &mut Sending, t: Duration) -> Result<(), Error> {
    for (handed, _) in &sending.queue {
        handed.check()?;
    }
    // Version 1 when it is enough: an old receiver then takes the connections (see the module header).
    let version = if sending.queue.iter().any(|(_, fds)| fds.peer.is_some()) {
        PROTOCOL_VERSION
    } else {
        OLDEST_VERSION
    };
    let hello = Hello {
        version,
        connections: sending.queue.len() as u64,
    };
    write(
        &conn,
        Body::Hello(hello).into_packet(),
        &[],
        t,
        "sending hello",
    )
    .await?;
    let mut buf = vec![0u8; REPLY_BUFFER];
    match read(&conn, &mut buf, t, "waiting for the receiver's hello").await? {
        Body::Hello(h) if h.version == version => {}
        Body::Hello(h) => {
            return Err(Error::Version {
                ours: version,
                theirs: h.version,
            })
        }
        Body::Refuse(r) => return Err(Error::Refused(r.reason)),
        other => return Err(unexpected("the receiver's hello", &other)),
    }
    let mut packer = Packer::default();
    while let Some(packed) = packer.next(&sending.queue) {
        // Each connection's app fd, then its peer fd if it has one (the order the receiver assigns).
        let fds: Vec<BorrowedFd<'_>> = packed
            .fds
            .iter()
            .flat_map(|&i| {
                let fds = &sending.queue[i].1;
                std::iter::once(fds.app.as_fd()).chain(fds.peer.as_ref().map(AsFd::as_fd))
            })
            .collect();
        // A failed or timed-out write sent nothing (a packet goes whole or not at all): no abort needed.
        write(&conn, packed.bytes, &fds, t, "sending a batch").await?;
        sending.packets += 1;
        if let Err(e) = await_ack(&conn, &mut buf, t, packed.seq, packed.completed).await {
            // The receiver may yet write the ack; `Abort` tells it we keep this batch.
            let _ = write(
                &conn,
                Body::Abort(Reason::of(&e)).into_packet(),
                &[],
                t,
                "aborting",
            )
            .await;
            return Err(e);
        }
        for (handed, fd) in sending.queue.drain(..packed.completed) {
            sending.taken.push(handed.id);
            drop(fd);
        }
        packer.taken(packed.completed);
    }
    write(
        &conn,
        Body::End(End {}).into_packet(),
        &[],
        t,
        "sending end",
    )
    .await
}

/// Connects, retrying while the receiver's accept queue is full, for at most `t`.
pub(super) async fn connect(path: &Path, t: Duration) -> Result<SeqpacketConn, Error> {
    let deadline = Instant::now() + t;
    loop {
        match SeqpacketConn::connect(path).await {
            Ok(conn) => return Ok(with_send_buffer(conn)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(CONNECT_RETRY).await
            }
            Err(source) => {
                return Err(Error::Io {
                    during: "connecting to the receiver",
                    source,
                })
            }
        }
    }
}

/// Reads the ack of batch `seq`, which completed `completed` connections.
async fn await_ack(
    conn: &SeqpacketConn,
    buf: &mut [u8],
    t: Duration,
    seq: u64,
    completed: usize,
) -> Result<(), Error> {
    match read(conn, buf, t, "waiting for an ack").await? {
        Body::Ack(ack) if ack.seq == seq && ack.accepted == completed as u64 => Ok(()),
        Body::Ack(ack) => Err(Error::BadAck {
            seq,
            expected: completed as u64,
            got_seq: ack.seq,
            got: ack.accepted,
        }),
        Body::Refuse(r) => Err(Error::Refused(r.reason)),
        other => Err(unexpected("an ack", &other)),
    }
}

/// Reads one packet that must carry no fds, within `t`.
async fn read(
    conn: &SeqpacketConn,
    buf: &mut [u8],
    t: Duration,
    during: &'static str,
) -> Result<Body, Error> {
    let (body, fds) = read_with_fds(conn, buf, t, during).await?;
    if !fds.is_empty() {
        return Err(Error::FdCount {
            expected: 0,
            got: fds.len(),
        });
    }
    Ok(body)
}
