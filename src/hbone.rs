//! HBONE: TCP streams carried as HTTP/2 CONNECT streams inside mutual TLS, wire-compatible with ztunnel.
//!
//! - [`pool`]: the client side — pooled, multiplexed HBONE connections keyed as ztunnel keys them, and the
//!   CONNECT request on top.
//! - [`server`]: the server side's HTTP/2 mechanics — accepting CONNECT streams and answering them; what to
//!   do with each stream is the inbound proxy's business.
//! - [`listener`]: terminating HBONE on a listener of its own (the waypoint's, the gateway's), with the node
//!   proxy's bounds.
//! - [`copy`]: moving bytes between a TCP socket and a CONNECT stream, with half-close and flow control.
//! - [`tunnel`]: one CONNECT stream read and written as bytes (`AsyncRead` + `AsyncWrite`), for a protocol
//!   run inside it (a waypoint's HTTP, double HBONE's inner TLS).
//! - [`double`]: double HBONE, an HBONE tunnel inside another, through a network's east-west gateway.
//! - [`resume`]: resumable streams (meshnode peers only): the framing, acknowledgements and resend that let
//!   a stream's end move to another process (upgrades; not wired into the copy yet).
//!
//! Memory a peer that stops reading can make us hold, per stream: towards the peer, at most
//! `min(peer's window, send buffer)` inside h2 (`SERVER_MAX_SEND_BUFFER`, 400 KiB, on the server; one
//! stream window on the client), because the copy only hands h2 what `capacity()` grants, plus one read
//! buffer (at most 256 KiB); towards the application, at most our stream window (4 MiB; our connection
//! window, 16 MiB, across a connection's streams), because capacity is given back only once the bytes are
//! written. An HBONE server connection runs at most `SERVER_MAX_CONCURRENT_STREAMS` (200) stream handlers.

pub mod copy;
pub mod double;
pub mod listener;
pub mod pool;
pub mod resume;
pub mod server;
pub mod tunnel;

use std::time::Duration;

use crate::config::H2Config;

/// The header naming the client's network on double HBONE's inner CONNECT (ztunnel's name).
pub const X_FORWARDED_NETWORK: &str = "x-forwarded-network";
/// Header list limit on requests we send (ztunnel: 16 KiB).
const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
/// Header list limit on requests we accept (ztunnel: 64 KiB).
const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
/// Concurrent streams a server advertises (ztunnel: 200).
const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Data a server may buffer per stream before applying back-pressure (ztunnel: 400 KiB).
const SERVER_MAX_SEND_BUFFER: usize = 400 * 1024;
/// Time allowed for a CONNECT response; a peer that never answers must not hold a client forever.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PING period on every HBONE connection (ztunnel: 10 s), to find dead peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A PING unanswered for this long closes the connection (ztunnel: 20 s).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A `hostname:port` CONNECT authority split in two; `None` when it is not one.
pub fn host_port(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

/// Pings the peer every [`KEEPALIVE_INTERVAL`]; returns when a ping goes unanswered for
/// [`KEEPALIVE_TIMEOUT`] or the connection is gone. Without a `PingPong` it never returns.
pub async fn keepalive(ping_pong: Option<h2::PingPong>) {
    let Some(mut pp) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::info!("HBONE peer stopped answering pings; closing the connection");
                return;
            }
        }
    }
}

/// An HTTP/2 client builder with HBONE's settings.
pub fn client_builder(cfg: &H2Config, max_streams: u32) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.frame_size)
        .max_header_list_size(CLIENT_MAX_HEADER_LIST)
        // Send buffer = one stream window, so a single stream can keep a whole window in flight.
        .max_send_buffer_size(cfg.stream_window as usize)
        .initial_max_send_streams(max_streams as usize)
        .enable_push(false);
    b
}

/// An HTTP/2 server builder with HBONE's settings.
pub fn server_builder(cfg: &H2Config) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.frame_size)
        .max_header_list_size(SERVER_MAX_HEADER_LIST)
        .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(SERVER_MAX_SEND_BUFFER);
    b
}
