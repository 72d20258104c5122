//! Copying bytes between a TCP socket and an HBONE (HTTP/2 CONNECT) stream, both directions at once.
//!
//! Input: the two halves of a TCP stream and the two halves of an HTTP/2 stream. Output: the byte counts
//! each way once both directions have finished. Half-close is carried across: TCP EOF becomes an empty DATA
//! frame with END_STREAM, END_STREAM becomes a TCP FIN (`shutdown(SHUT_WR)`). A peer reset with NO_ERROR or
//! CANCEL reads as a clean end, as in ztunnel.
//!
//! Buffer policy: an idle connection holds no read buffer. While reads are small (request/response
//! traffic) they go into a per-thread scratch buffer and only the bytes read are copied out, into a chunk
//! of exactly their size that h2 then owns. A read that fills the scratch buffer switches the connection to
//! bulk mode: reads go straight into a `BytesMut` of its own whose filled part is handed to h2 without
//! copying (`split().freeze()`), the read size doubling (up to [`MAX_READ`]) while reads keep filling it,
//! so bulk transfers get large frames and TLS records. The first read that finds nothing to read drops that
//! buffer and returns to small reads.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Small-read size, the per-thread scratch buffer's: one TLS record's worth of payload, enough for
/// request/response traffic.
const SMALL_READ: usize = 16 * 1024;
/// Largest read size: a few TLS records per frame, where the per-frame overhead stops mattering.
pub(crate) const MAX_READ: usize = 256 * 1024;

thread_local! {
    /// Where small reads land before their bytes are copied out (one per runtime thread).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SMALL_READ].into_boxed_slice());
}

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the TCP side into the HBONE stream.
    pub tcp_to_hbone: u64,
    /// From the HBONE stream out to the TCP side.
    pub hbone_to_tcp: u64,
}

/// Runs both directions until each has ended. On an error in either direction the stream is reset and the
/// error returned. The stream's halves are borrowed: the caller holds them (once) and drops them after.
pub async fn bidirectional<R, W>(
    tcp_read: &mut R,
    tcp_write: &mut W,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
) -> io::Result<Transferred>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let up = tcp_to_h2(tcp_read, send);
    let down = h2_to_tcp(recv, tcp_write);
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
    let mut reader = Reader::default();
    let mut total = 0u64;
    loop {
        let mut chunk = poll_fn(|cx| reader.poll_chunk(cx, r)).await?;
        if chunk.is_empty() {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += chunk.len() as u64;
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

/// Reads chunks from a socket without holding a buffer while it is idle (see the module's buffer policy).
#[derive(Debug, Default)]
pub(crate) struct Reader {
    /// Bulk mode: the connection's own buffer and the next read's size. `None`: small reads.
    bulk: Option<(BytesMut, usize)>,
}

impl Reader {
    /// The next chunk read; empty at end of stream.
    pub(crate) fn poll_chunk<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<io::Result<Bytes>> {
        if let Some((buf, size)) = &mut self.bulk {
            buf.reserve(*size);
            return match tokio_util::io::poll_read_buf(Pin::new(r), cx, buf) {
                Poll::Pending => {
                    // Drained: the buffer goes (h2 still owns what it was given) until data flows again.
                    self.bulk = None;
                    Poll::Pending
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => {
                    if n >= *size && *size < MAX_READ {
                        *size *= 2;
                    }
                    Poll::Ready(Ok(buf.split().freeze()))
                }
            };
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let mut rb = ReadBuf::new(scratch);
            ready!(Pin::new(r).poll_read(cx, &mut rb))?;
            let filled = rb.filled();
            if filled.len() == SMALL_READ {
                self.bulk = Some((BytesMut::new(), 2 * SMALL_READ));
            }
            Poll::Ready(Ok(Bytes::copy_from_slice(filled)))
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn poll_once<R: AsyncRead + Unpin>(reader: &mut Reader, r: &mut R) -> Poll<io::Result<Bytes>> {
        reader.poll_chunk(&mut Context::from_waker(std::task::Waker::noop()), r)
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer() {
        let (mut app, mut sock) = tokio::io::duplex(1 << 20);
        let mut reader = Reader::default();
        assert!(poll_once(&mut reader, &mut sock).is_pending());

        // A small message is copied out at its own size; nothing stays behind.
        app.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let Poll::Ready(Ok(chunk)) = poll_once(&mut reader, &mut sock) else {
            panic!("a written message must be readable")
        };
        assert_eq!(&chunk[..], b"GET / HTTP/1.1\r\n\r\n");
        assert!(reader.bulk.is_none());

        // A full scratch buffer means bulk: the next reads go into the connection's own growing buffer.
        app.write_all(&vec![7u8; 300 * 1024]).await.unwrap();
        let mut sizes = Vec::new();
        let mut got = 0;
        while got < 300 * 1024 {
            let Poll::Ready(Ok(chunk)) = poll_once(&mut reader, &mut sock) else {
                panic!("bulk data must be readable")
            };
            assert!(chunk.iter().all(|&b| b == 7));
            got += chunk.len();
            sizes.push(chunk.len());
        }
        assert_eq!(got, 300 * 1024);
        assert_eq!(sizes[..3], [SMALL_READ, 2 * SMALL_READ, 4 * SMALL_READ]);
        assert!(sizes.iter().all(|&n| n <= MAX_READ));
        assert!(reader.bulk.is_some());

        // Drained: the buffer is released.
        assert!(poll_once(&mut reader, &mut sock).is_pending());
        assert!(reader.bulk.is_none());

        // End of stream is an empty chunk.
        drop(app);
        let Poll::Ready(Ok(end)) = poll_once(&mut reader, &mut sock) else {
            panic!("end of stream must be reported")
        };
        assert!(end.is_empty());
    }

    /// A socket that gives what it is told, in order: bytes, or an error.
    struct Scripted(std::collections::VecDeque<io::Result<Vec<u8>>>);

    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.0.pop_front() {
                Some(Ok(bytes)) => {
                    buf.put_slice(&bytes);
                    Poll::Ready(Ok(()))
                }
                Some(Err(e)) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            }
        }
    }

    #[test]
    fn a_read_error_reaches_the_copy_in_small_and_bulk_mode() {
        let reset = || io::Error::from(io::ErrorKind::ConnectionReset);
        // Small reads: the error comes out as it was.
        let mut reader = Reader::default();
        let mut sock = Scripted([Ok(b"hi".to_vec()), Err(reset())].into());
        assert!(matches!(poll_once(&mut reader, &mut sock), Poll::Ready(Ok(c)) if &c[..] == b"hi"));
        let Poll::Ready(Err(e)) = poll_once(&mut reader, &mut sock) else {
            panic!("the read error must be reported")
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);

        // Bulk: a full scratch read switches mode, and the next read's error still comes out.
        let mut reader = Reader::default();
        let mut sock = Scripted([Ok(vec![1; SMALL_READ]), Err(reset())].into());
        assert!(
            matches!(poll_once(&mut reader, &mut sock), Poll::Ready(Ok(c)) if c.len() == SMALL_READ)
        );
        assert!(reader.bulk.is_some());
        let Poll::Ready(Err(e)) = poll_once(&mut reader, &mut sock) else {
            panic!("the read error must be reported in bulk mode")
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
