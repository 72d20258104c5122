//! Double HBONE: an HBONE tunnel carried inside another, for destinations on another network.
//!
//! Input: an open outer CONNECT stream (to the destination network's east-west gateway, from the
//! [`pool`](super::pool)), the source identity's [`TlsMaterial`], the identities the far end may present
//! and the inner CONNECT request. Output: the inner stream, its `200` received, as a [`Stream`] like any
//! other. The inner tunnel is its own mutual TLS 1.3 session (our certificate again, the destination's
//! identity checked) and its own HTTP/2 connection, run over the outer stream's bytes, so the gateway
//! in between forwards it without being able to read or alter it. As ztunnel does, the inner connection
//! is never pooled: one inner connection per application connection, so that the gateway's choice of
//! endpoint is made per connection. It ends when its stream does, and releases the outer stream then.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{Error, Slot, Stream};
use super::tunnel::Tunnel;
use crate::config::H2Config;
use crate::identity::Identity;
use crate::tls::{dummy_server_name, TlsMaterial};

/// The `x-forwarded-network` value naming `network`, for [`forward_network`]: built once by the caller
/// (its network does not change), `None` when the name cannot be a header value.
pub fn network_header(network: &str) -> Option<http::HeaderValue> {
    http::HeaderValue::from_str(network).ok()
}

/// Names the client's network ([`network_header`]) on `req`, the inner CONNECT (`x-forwarded-network`,
/// as ztunnel sends it): the destination then knows that the source address it sees is not the client's
/// own. A network name that cannot be a header value (`None`) is left out.
pub fn forward_network(req: &mut http::Request<()>, network: Option<&http::HeaderValue>) {
    if let Some(v) = network {
        req.headers_mut()
            .insert(super::X_FORWARDED_NETWORK, v.clone());
    }
}

/// Opens the inner tunnel over `outer` (dialled to `via`, the gateway) and sends `req` on it. Errors are
/// the inner tunnel's, wrapped in [`Error::Inner`]; they name `via`, the only address this side knows.
pub async fn connect(
    outer: Stream,
    via: SocketAddr,
    tls: &TlsMaterial,
    expected: Vec<Identity>,
    h2: &H2Config,
    timeout: Duration,
    req: http::Request<()>,
) -> Result<Stream, Error> {
    inner(outer, via, tls, expected, h2, timeout, req)
        .await
        .map_err(|e| Error::Inner(Box::new(e)))
}

async fn inner(
    outer: Stream,
    via: SocketAddr,
    tls: &TlsMaterial,
    expected: Vec<Identity>,
    h2: &H2Config,
    timeout: Duration,
    req: http::Request<()>,
) -> Result<Stream, Error> {
    let dst = via;
    let io = Outer(Some(Tunnel::from_client(outer)));
    let connector = tokio_rustls::TlsConnector::from(tls.client_config(expected));
    let tls_stream = tokio::time::timeout(timeout, connector.connect(dummy_server_name(), io))
        .await
        .map_err(|_| Error::Timeout { dst })?
        .map_err(|source| Error::Tls { dst, source })?;
    // One stream only: the connection exists for this application connection.
    let (send_request, connection) = tokio::time::timeout(
        timeout,
        super::client_builder(h2, 1).handshake::<_, Bytes>(tls_stream),
    )
    .await
    .map_err(|_| Error::Timeout { dst })?
    .map_err(|source| Error::H2 { dst, source })?;
    let mut connection = connection;
    let pings = super::keepalive(connection.ping_pong());
    // The connection's driver owns the inner TLS session and, through it, the outer stream: once the
    // inner stream and the request handle are gone, h2 closes the connection and the outer slot is freed.
    tokio::spawn(async move {
        tokio::select! {
            r = &mut connection => if let Err(e) = r {
                tracing::debug!(%dst, error = %e, "inner HBONE connection ended");
            },
            _ = pings => {}
        }
    });
    let (response, send) = send_request
        .ready()
        .await
        .and_then(|mut s| s.send_request(req, false))
        .map_err(|source| Error::H2 { dst, source })?;
    let (headers, recv) = super::pool::answered(dst, response).await?;
    Ok(Stream {
        send,
        recv,
        headers,
        slot: Slot::unpooled(),
    })
}

/// How long a finished outer stream waits for the gateway's END_STREAM before it is reset.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The outer stream under the inner TLS session. h2 drops it as soon as the inner connection has shut
/// down (close_notify, then END_STREAM); the gateway's own END_STREAM is still on its way, so a clean
/// end is waited for (bounded) instead of resetting the stream under it.
struct Outer(Option<Tunnel>);

impl Outer {
    fn tunnel(&mut self) -> &mut Tunnel {
        self.0.as_mut().expect("present until dropped")
    }
}

impl Drop for Outer {
    fn drop(&mut self) {
        let Some(tunnel) = self.0.take() else { return };
        if !tunnel.is_shut() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, tunnel.drain()).await;
            });
        }
    }
}

impl AsyncRead for Outer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.tunnel()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Outer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.tunnel()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.tunnel()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.tunnel()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use h2::server::SendResponse;
    use h2::RecvStream;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::hbone::pool::Slot;

    /// What the gateway holds of the outer stream: its answer's send half and the client's bytes.
    struct GatewaySide {
        send: h2::SendStream<Bytes>,
        recv: RecvStream,
    }

    /// An outer stream over an in-memory HTTP/2 connection, answered 200 by a stand-in gateway.
    async fn outer_stream() -> (Outer, GatewaySide) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (accepted_tx, accepted_rx) =
            tokio::sync::oneshot::channel::<(http::Request<RecvStream>, SendResponse<Bytes>)>();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            if let Some(Ok(stream)) = conn.accept().await {
                let _ = accepted_tx.send(stream);
            }
            // Keeps driving the connection.
            while conn.accept().await.is_some() {}
        });
        let (send_request, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("echo.default.svc.cluster.local:80")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        let (response, send) = send_request
            .ready()
            .await
            .unwrap()
            .send_request(req, false)
            .unwrap();
        let (req, mut respond) = accepted_rx.await.unwrap();
        let ok = http::Response::builder().status(200).body(()).unwrap();
        let gateway_send = respond.send_response(ok, false).unwrap();
        let recv = response.await.unwrap().into_body();
        let outer = Outer(Some(Tunnel::new(send, recv, Slot::unpooled())));
        let gateway = GatewaySide {
            send: gateway_send,
            recv: req.into_body(),
        };
        (outer, gateway)
    }

    /// Whether the client resets the stream within `wait`, and with what. An error (the connection
    /// broken) is no answer: it panics.
    async fn reset_within(send: &mut h2::SendStream<Bytes>, wait: Duration) -> Option<h2::Reason> {
        tokio::time::timeout(wait, poll_fn(|cx| send.poll_reset(cx)))
            .await
            .ok()
            .map(|r| r.expect("the connection stays up"))
    }

    #[tokio::test]
    async fn an_outer_stream_ended_cleanly_waits_for_the_gateways_end_instead_of_resetting() {
        let (mut outer, mut gw) = outer_stream().await;
        outer.write_all(b"inner bytes").await.unwrap();
        // The inner connection has shut down: END_STREAM on the outer stream, then h2 drops it.
        outer.shutdown().await.unwrap();
        drop(outer);
        // The client's half ends with END_STREAM (no error on the way).
        let mut got = Vec::new();
        while let Some(chunk) = gw.recv.data().await {
            got.extend_from_slice(&chunk.expect("no reset from the client"));
        }
        assert_eq!(got, b"inner bytes");
        // The gateway's own end is still on its way: the stream must not be reset meanwhile.
        assert_eq!(
            reset_within(&mut gw.send, Duration::from_millis(300)).await,
            None
        );
        // Meanwhile the client keeps reading: the gateway's answer, longer than the stream's flow-control
        // window, goes through (the capacity it waits for is released as the client reads), then ends.
        let mut left = 256 * 1024;
        let chunk = Bytes::from(vec![7u8; 16 * 1024]);
        tokio::time::timeout(Duration::from_secs(5), async {
            while left > 0 {
                gw.send.reserve_capacity(chunk.len());
                let n = poll_fn(|cx| gw.send.poll_capacity(cx))
                    .await
                    .expect("the stream is still open")
                    .expect("no reset from the client")
                    .min(left);
                gw.send
                    .send_data(chunk.slice(..n), false)
                    .expect("no reset from the client");
                left -= n;
            }
        })
        .await
        .expect("the client reads the gateway's answer to its end");
        gw.send
            .send_data(Bytes::new(), true)
            .expect("the gateway ends its half cleanly");
    }

    #[tokio::test]
    async fn an_outer_stream_dropped_before_it_ended_is_reset() {
        let (outer, mut gw) = outer_stream().await;
        drop(outer);
        assert_eq!(
            reset_within(&mut gw.send, Duration::from_secs(2)).await,
            Some(h2::Reason::CANCEL)
        );
    }
}
