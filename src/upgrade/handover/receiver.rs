//! The new process's side of one hand-over: hello, then batches until `End`, each checked, assembled and
//! acknowledged.
//!
//! Input: an accepted connection from a sender. Output: a [`Received`]. A batch's connections are the
//! receiver's once its ack is written; the last batch acknowledged is given back (its fds closed) only if
//! the sender's next message is `Abort` (see the ownership rule in `handover`'s header).

use std::time::Duration;

use crate::zds::packet::SeqpacketConn;

use super::wire::{Ack, Assembler, Body, Hello, Reason};
use super::{
    read_with_fds as read, unexpected, write, Error, Fds, Handed, Received, MAX_PACKET,
    OLDEST_VERSION, PROTOCOL_VERSION,
};

/// The receiver's state: what it has taken, and how many of those the sender may still abort.
#[derive(Default)]
struct Receiving {
    taken: Vec<(Handed, Fds)>,
    /// How many of the last entries of `taken` came with the last ack, which the sender's next message
    /// confirms (anything but `Abort`) or withdraws (`Abort`).
    unconfirmed: usize,
    packets: usize,
}

/// Takes every connection the sender on `conn` hands over.
pub(super) async fn receive(conn: &SeqpacketConn, io_timeout: Duration) -> Received {
    let mut receiving = Receiving::default();
    let error = run(conn, &mut receiving, io_timeout).await.err();
    if let Some(e) = &error {
        if !matches!(
            e,
            Error::Aborted(_) | Error::Closed { .. } | Error::Io { .. }
        ) {
            // Best effort: the sender learns why (it keeps the batch either way, as it has no ack).
            let reason = Body::Refuse(Reason::of(e)).into_packet();
            let _ = write(conn, reason, &[], io_timeout, "refusing").await;
        }
    }
    Received {
        conns: receiving.taken,
        packets: receiving.packets,
        error,
    }
}

async fn run(conn: &SeqpacketConn, receiving: &mut Receiving, t: Duration) -> Result<(), Error> {
    let mut buf = vec![0u8; MAX_PACKET];
    let hello = match read(conn, &mut buf, t, "waiting for the sender's hello").await? {
        (Body::Hello(hello), fds) if fds.is_empty() => hello,
        (_, fds) if !fds.is_empty() => {
            return Err(Error::FdCount {
                expected: 0,
                got: fds.len(),
            })
        }
        (other, _) => return Err(unexpected("the sender's hello", &other)),
    };
    // Our hello goes first either way: the sender's version when we take it (an old sender refuses any
    // other answer), else ours, so a sender of another version learns it.
    let known = (OLDEST_VERSION..=PROTOCOL_VERSION).contains(&hello.version);
    let ours = Hello {
        version: if known {
            hello.version
        } else {
            PROTOCOL_VERSION
        },
        connections: 0,
    };
    write(
        conn,
        Body::Hello(ours).into_packet(),
        &[],
        t,
        "sending hello",
    )
    .await?;
    if !known {
        return Err(Error::Version {
            ours: PROTOCOL_VERSION,
            theirs: hello.version,
        });
    }
    let mut assembler = Assembler::new(hello.connections, hello.version)?;
    // Twice the sender's deadline, so that a live sender that gives up on an ack says `Abort` first.
    let wait = 2 * t;
    loop {
        let (body, fds) = read(conn, &mut buf, wait, "waiting for the next batch").await?;
        if let Body::Abort(reason) = body {
            let keep = receiving.taken.len() - receiving.unconfirmed;
            receiving.taken.truncate(keep);
            return Err(Error::Aborted(reason.reason));
        }
        receiving.unconfirmed = 0;
        match body {
            Body::Batch(batch) => {
                let seq = batch.seq;
                let done = assembler.apply(batch, fds)?;
                let ack = Ack {
                    seq,
                    accepted: done.len() as u64,
                };
                // Not written, not taken: the sender keeps what it has no ack for.
                write(conn, Body::Ack(ack).into_packet(), &[], t, "sending an ack").await?;
                receiving.packets += 1;
                receiving.unconfirmed = done.len();
                receiving.taken.extend(done);
            }
            Body::End(_) if fds.is_empty() => return assembler.finish(),
            _ if !fds.is_empty() => {
                return Err(Error::FdCount {
                    expected: 0,
                    got: fds.len(),
                })
            }
            other => return Err(unexpected("a batch or end", &other)),
        }
    }
}
