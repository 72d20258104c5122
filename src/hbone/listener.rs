//! Terminating HBONE on a listener of a role that runs as its own process (the waypoint, the east-west
//! gateway), with the node proxy's bounds.
//!
//! Input: a bound listener, the role's [`Config`] (connection limit, handshake slots per source, handshake
//! and idle timeouts, termination deadline, HTTP/2 settings, TCP keepalive), the TLS server configuration
//! of its certificate at the time of each accept, a shutdown signal and a handler per CONNECT stream.
//! Output: [`accept_loop`] runs until shutdown and then waits (bounded) for open connections; [`terminate`]
//! takes one connection through admission, mutual TLS and the peer's SPIFFE identity to the HTTP/2 server,
//! logging refusals as access lines (target `access`) with the role as `reporter`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::server::{self, Incoming};
use crate::config::Config;
use crate::identity::Identity;
use crate::socket;

/// Accepts on `listener` until `shutdown`, at most `base.max_connections` connections at once (more wait
/// in the kernel's backlog), each handed to `conn`; then waits up to `base.termination_deadline` for the
/// open ones to finish.
pub async fn accept_loop<C, F>(
    listener: TcpListener,
    base: &Config,
    mut shutdown: watch::Receiver<bool>,
    conn: C,
) where
    C: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(());
    let limit = Arc::new(tokio::sync::Semaphore::new(base.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let held = open.clone();
        let task = conn(stream, socket::canonical(peer));
        tokio::spawn(async move {
            task.await;
            drop(permit);
            drop(held);
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + base.termination_deadline;
    while Arc::strong_count(&open) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client connection: TCP options, a handshake slot for its address, mutual TLS with `tls` (a
/// certificate of the mesh required), the peer's identity, then its CONNECT streams, each given to
/// `handle` with that identity.
pub async fn terminate<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    base: &Config,
    tls: Arc<rustls::ServerConfig>,
    reporter: &'static str,
    shutdown: watch::Receiver<bool>,
    handle: H,
) where
    H: Fn(Incoming, Identity) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let _ = socket::accepted(&stream);
    let _ = socket::keepalive(&stream, &base.keepalive);
    let Some(handshake) = base.admission.handshake(peer.ip()) else {
        tracing::info!(target: "access", reporter, src.addr = %peer, "connection refused: too many handshakes in progress from this address");
        socket::reset_on_close(&stream);
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake_deadline = tokio::time::Instant::now() + base.handshake_timeout;
    let tls = match tokio::time::timeout_at(handshake_deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(target: "access", reporter, src.addr = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(target: "access", reporter, src.addr = %peer, "TLS handshake timed out");
            return;
        }
    };
    let Some(peer_id) = crate::tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        // The verifier only admits certificates with a SPIFFE SAN; this is defence in depth.
        tracing::warn!(src.addr = %peer, "peer certificate has no SPIFFE identity");
        return;
    };
    let timeouts = server::Timeouts {
        handshake_deadline,
        idle: base.hbone_idle_timeout,
    };
    let res = server::serve(
        tls,
        &base.h2,
        timeouts,
        handshake,
        shutdown,
        move |incoming| handle(incoming, peer_id.clone()),
    )
    .await;
    if let Err(e) = res {
        tracing::debug!(src.addr = %peer, error = %e, "HBONE connection ended with an error");
    }
}
