//! Copying bytes between a TCP socket and an HBONE (HTTP/2 CONNECT) stream, both directions at once.
//!
//! Input: the two halves of a TCP stream and the two halves of an HTTP/2 stream. Output: the byte counts
//! each way once both directions have finished. Half-close is carried across: TCP EOF becomes an empty DATA
//! frame with END_STREAM, END_STREAM becomes a TCP FIN (`shutdown(SHUT_WR)`). A peer reset with NO_ERROR or
//! CANCEL reads as a clean end, as in ztunnel.
//!
//! Buffer policy: reads go straight into a `BytesMut` whose filled part is handed to h2 without copying
//! (`split().freeze()`); once h2 has written the frame, the buffer's memory is reused by the next
//! `reserve`. The read size starts small so idle connections cost little, and doubles (up to
//! [`MAX_READ`]) while reads keep filling it, so bulk transfers get large frames and TLS records.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First read size: one TLS record's worth of payload, enough for request/response traffic.
const INITIAL_READ: usize = 16 * 1024;
/// Largest read size: a few TLS records per frame, where the per-frame overhead stops mattering.
const MAX_READ: usize = 256 * 1024;

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the TCP side into the HBONE stream.
    pub tcp_to_hbone: u64,
    /// From the HBONE stream out to the TCP side.
    pub hbone_to_tcp: u64,
}

/// Runs both directions until each has ended. On an error in either direction the stream is reset and the
/// error returned.
pub async fn bidirectional<R, W>(
    tcp_read: &mut R,
    tcp_write: &mut W,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<Transferred>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let up = tcp_to_h2(tcp_read, &mut send);
    let down = h2_to_tcp(&mut recv, tcp_write);
    match tokio::try_join!(up, down) {
        Ok((tcp_to_hbone, hbone_to_tcp)) => Ok(Transferred {
            tcp_to_hbone,
            hbone_to_tcp,
        }),
        Err(e) => {
            send.send_reset(Reason::CANCEL);
            Err(e)
        }
    }
}

async fn tcp_to_h2<R: AsyncRead + Unpin>(
    r: &mut R,
    send: &mut SendStream<Bytes>,
) -> io::Result<u64> {
    let mut buf = BytesMut::new();
    let mut read_size = INITIAL_READ;
    let mut total = 0u64;
    loop {
        buf.reserve(read_size);
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        if n >= read_size && read_size < MAX_READ {
            read_size *= 2;
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = loop {
                let cap = send.capacity();
                if cap > 0 {
                    break cap;
                }
                match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(h2_io(e)),
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "HBONE stream closed by peer",
                        ))
                    }
                }
            };
            let part = chunk.split_to(cap.min(chunk.len()));
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

async fn h2_to_tcp<W: AsyncWrite + Unpin>(recv: &mut RecvStream, w: &mut W) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                w.write_all(&chunk).await?;
                total += n as u64;
                // Give the window back only once the bytes are out, so a slow reader slows the sender.
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(e)) if is_clean_reset(&e) => break,
            Some(Err(e)) => return Err(h2_io(e)),
            None => break,
        }
    }
    w.shutdown().await?;
    Ok(total)
}

fn is_clean_reset(e: &h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

/// Maps an h2 error to an I/O error, keeping I/O errors as they were.
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}
