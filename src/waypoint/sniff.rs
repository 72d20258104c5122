//! What a stream speaks, from its first bytes: the HTTP/2 connection preface, an HTTP/1.x request line, or
//! something else (TCP) — Envoy's HTTP inspector, for ports whose protocol is not declared — and the
//! stream handed on with those bytes put back in front ([`Rewind`]).
//!
//! Input: a fresh stream, whether the port is declared HTTP (only the version is left to find out) or
//! unknown, and a time limit. Output: the [`Detected`] protocol and a [`Rewind`] that replays what was read.
//! A client that sends nothing within the limit is TCP (a server-first protocol) on an unknown port; on an
//! HTTP port it is handed to the HTTP/1 server, whose own header timeout then answers it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Request methods that mark HTTP/1.x on an undeclared port (RFC 9110 plus PATCH), as Envoy's inspector
/// knows them.
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];
/// More than any prefix the decision needs (the preface is 24 bytes, the longest method 7).
const SNIFF_READ: usize = 64;

/// The protocol found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else.
    Tcp,
}

/// A stream with bytes already read put back in front.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `inner`, with `prefix` read first.
    pub fn new(prefix: Bytes, inner: T) -> Rewind<T> {
        Rewind { prefix, inner }
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The stream underneath, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The decision on what has been read so far; `None` while it could still go either way.
fn decide(buf: &[u8], declared_http: bool) -> Option<Detected> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    if declared_http {
        return Some(Detected::Http1);
    }
    match buf.iter().position(|b| *b == b' ') {
        Some(sp) if METHODS.contains(&&buf[..sp]) => Some(Detected::Http1),
        Some(_) => Some(Detected::Tcp),
        None if METHODS.iter().any(|m| m.starts_with(buf)) => None,
        None => Some(Detected::Tcp),
    }
}

/// Reads until the protocol is known (or `timeout`, or EOF) and returns it with the stream rewound.
pub async fn detect<T: AsyncRead + Unpin>(
    mut io: T,
    declared_http: bool,
    timeout: Duration,
) -> io::Result<(Detected, Rewind<T>)> {
    let mut buf = BytesMut::with_capacity(SNIFF_READ);
    let deadline = tokio::time::Instant::now() + timeout;
    let detected = loop {
        if !buf.is_empty() {
            if let Some(d) = decide(&buf, declared_http) {
                break d;
            }
        }
        if buf.len() >= SNIFF_READ {
            break Detected::Tcp;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => {
                // EOF or silence: an HTTP port goes to the HTTP server, which answers or closes; otherwise
                // what looked like the start of a request is still HTTP, and anything else is TCP.
                let partial_http = !buf.is_empty() && decide(&buf, false) != Some(Detected::Tcp);
                break if declared_http || partial_http {
                    Detected::Http1
                } else {
                    Detected::Tcp
                };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((detected, Rewind::new(buf.freeze(), io)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http1_http2_and_tcp_apart() {
        assert_eq!(decide(b"GET / HTTP/1.1\r\n", false), Some(Detected::Http1));
        assert_eq!(decide(b"PATCH /x", false), Some(Detected::Http1));
        assert_eq!(decide(H2_PREFACE, false), Some(Detected::Http2));
        assert_eq!(decide(b"PRI * HT", false), None);
        assert_eq!(decide(b"GE", false), None);
        assert_eq!(decide(b"\x16\x03\x01", false), Some(Detected::Tcp));
        assert_eq!(decide(b"HELLO world", false), Some(Detected::Tcp));
        // On a declared HTTP port only the version is in question.
        assert_eq!(decide(b"HELLO", true), Some(Detected::Http1));
        assert_eq!(decide(b"PRI", true), None);
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed_in_order() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        drop(a);
        let (d, mut r) = detect(b, false, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_silent_client_on_an_undeclared_port_is_tcp() {
        let (_a, b) = tokio::io::duplex(64);
        let (d, _) = detect(b, false, Duration::from_millis(20)).await.unwrap();
        assert_eq!(d, Detected::Tcp);
    }
}
