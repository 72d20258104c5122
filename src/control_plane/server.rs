//! Serving the control plane's gRPC services over TLS on an already-bound listener.
//!
//! Input: a `TcpListener`, a `rustls::ServerConfig` (whose certificate the caller chooses: from the mesh CA
//! in production, [`ServerCert::throwaway`] in tests), a tonic [`Router`] holding the services (ADS from
//! [`router`], plus the CA service added by the caller with `.add_service(..)`), and a shutdown future.
//! Output: connections accepted until shutdown.
//!
//! Bounds ([`ServeLimits`]), so that no client, idle or hostile, can take the server from the others: at most
//! [`ServeLimits::max_connections`] connections at once; TLS handshakes run off the accept loop, at most
//! [`ServeLimits::max_handshakes`] at once and [`ServeLimits::max_handshakes_per_source`] per source (an IPv4
//! address or an IPv6 /64), each within [`ServeLimits::handshake_timeout`]. A connection over any of these is
//! closed at once (the accept loop never waits for a slot, so idle sockets cannot stall it). HTTP/2 keepalive drops dead peers, and a
//! connection with no open stream and no authorized request for [`ServeLimits::idle_timeout`] is closed.
//!
//! Shutdown, as istiod's: the listener is closed at once, connections are told to go away (HTTP/2 GOAWAY)
//! and given [`ServeLimits::drain_deadline`] to finish; xDS streams never finish by themselves, so at the
//! deadline every remaining connection is closed and its clients reconnect elsewhere.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, Router};
use tonic::transport::Server;

use super::ads::AdsServer;

/// Handshaken connections waiting for the HTTP/2 server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// HTTP/2 keepalive, as ztunnel's client side: a ping every 30 s, 10 s to answer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// After the drain deadline, how long closed connections get to wind down before `serve` returns anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The bounds of the server (see the module header).
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Connections open at once, handshaking or established.
    pub max_connections: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one source (an IPv4 address or an IPv6 /64).
    pub max_handshakes_per_source: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection with no open stream and no authorized request for this long is closed.
    pub idle_timeout: Duration,
    /// At shutdown, how long connections get to finish before they are closed.
    pub drain_deadline: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            // A node proxy holds one xDS and one CA connection: room for two thousand nodes.
            max_connections: 4096,
            // A handshake takes a few ms of CPU; 256 at once already saturate two cores.
            max_handshakes: 256,
            // A node proxy opens two connections; a NAT gateway may hide a few nodes behind one address.
            max_handshakes_per_source: 16,
            // A real client finishes in milliseconds; 10 s allows for a congested link.
            handshake_timeout: Duration::from_secs(10),
            // A CA connection is used twice a day (rotation): it is cheaper to reconnect than to keep it.
            idle_timeout: Duration::from_secs(300),
            // istiod's default drain period.
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
        }
    }
}

/// How long connections get to finish at shutdown unless told otherwise (istiod's default).
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Why the server could not be set up or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A certificate or key could not be read.
    #[error("server certificate: {reason}")]
    Certificate {
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("server TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A tonic router serving `ads`, with the control plane's HTTP/2 settings. Add more services (the CA) with
/// `.add_service(..)` before passing it to [`serve`].
pub fn router(ads: AdsServer) -> Router {
    router_with_auth(ads, Ok)
}

/// Like [`router`], with `auth` run on every ADS request (e.g. a bearer-token check) before it is served.
pub fn router_with_auth<F>(ads: AdsServer, auth: F) -> Router
where
    F: tonic::service::Interceptor + Clone + Send + Sync + 'static,
{
    let mut auth = auth;
    let auth = move |req: tonic::Request<()>| {
        let req = auth.call(req)?;
        mark_request(&req);
        Ok(req)
    };
    Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_nodelay(true)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ads.into_service(),
            auth,
        ))
}

/// A rustls server config from a PEM certificate chain (leaf first) and PEM private key, ALPN `h2`.
pub fn tls_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate {
            reason: format!("certificate chain is not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(Error::Certificate {
            reason: "no CERTIFICATE in the chain".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| Error::Certificate {
        reason: format!("private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A throwaway CA and a server certificate it signed: for tests and for running without a mesh CA.
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// The CA certificate clients must trust (`XDS_ROOT_CA` / `CA_ROOT_CA`).
    pub root_pem: String,
    /// The server certificate.
    pub cert_pem: String,
    /// The server's private key (PKCS#8).
    pub key_pem: String,
}

impl ServerCert {
    /// A fresh CA and a server certificate for `names` (DNS names or IP addresses), valid for a year.
    pub fn throwaway(names: &[&str]) -> Result<ServerCert, Error> {
        let fail = |e: rcgen::Error| Error::Certificate {
            reason: e.to_string(),
        };
        let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "meshnode control-plane throwaway CA",
        );
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca_params.self_signed(&ca_key).map_err(fail)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).map_err(fail)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "istiod");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &issuer).map_err(fail)?;
        Ok(ServerCert {
            root_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The rustls config serving this certificate.
    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        tls_config(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

/// Serves `router` over TLS on `listener`, within `limits`, until `shutdown` completes; then drains (see
/// the module header) and returns.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: ServeLimits,
    shutdown: F,
) -> Result<(), Error>
where
    F: Future<Output = ()> + Send,
{
    let (tx, mut rx) = mpsc::channel::<Conn>(ACCEPTED_QUEUE);
    let (close_all, closing) = watch::channel(false);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let acceptor = TlsAcceptor::from(tls);
    let drain_deadline = limits.drain_deadline;
    let accept = tokio::spawn(accept_loop(listener, acceptor, tx, limits, closing));
    let incoming = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|s| s.map(Ok::<_, std::io::Error>))
    });
    let serving = router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    tokio::pin!(serving);
    tokio::pin!(shutdown);
    tokio::select! {
        result = &mut serving => {
            accept.abort();
            return Ok(result?);
        }
        _ = &mut shutdown => {}
    }
    // Stop accepting: aborting the accept task drops (closes) the listener.
    accept.abort();
    let _ = accept.await;
    let _ = stop_tx.send(true);
    tracing::info!(deadline = ?drain_deadline, "control plane draining: listener closed, connections told to go away");
    let result = match tokio::time::timeout(drain_deadline, &mut serving).await {
        Ok(result) => result,
        Err(_) => {
            tracing::info!("drain deadline passed: closing the remaining connections (xDS clients reconnect elsewhere)");
            let _ = close_all.send(true);
            match tokio::time::timeout(CLOSE_GRACE, &mut serving).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    };
    Ok(result?)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<Conn>,
    limits: ServeLimits,
    closing: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let per_source = Arc::new(Mutex::new(HashMap::new()));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "control plane: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        // Over a limit: the connection is closed at once (dropped), the loop goes on accepting.
        let Ok(connection) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, max = limits.max_connections, "control plane: connection refused: too many connections");
            continue;
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%peer, max = limits.max_handshakes, "control plane: connection refused: too many TLS handshakes in progress");
            continue;
        };
        let Some(source) = SourceSlot::take(
            &per_source,
            source_key(peer.ip()),
            limits.max_handshakes_per_source,
        ) else {
            tracing::debug!(%peer, max = limits.max_handshakes_per_source, "control plane: connection refused: too many TLS handshakes from this address");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let closing = closing.clone();
        let (handshake_timeout, idle_timeout) = (limits.handshake_timeout, limits.idle_timeout);
        tokio::spawn(async move {
            let tls = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
            drop((handshake, source));
            match tls {
                Ok(Ok(tls)) => {
                    let conn = Conn::new(tls, peer, connection, idle_timeout, closing);
                    let _ = tx.send(conn).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "control plane: TLS handshake failed")
                }
                Err(_) => tracing::debug!(%peer, "control plane: TLS handshake timed out"),
            }
        });
    }
}

/// The source a connection is counted against: its IPv4 address, or the /64 of an IPv6 one (a single host
/// commonly holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
        v4 => v4,
    }
}

/// One handshake slot of a source address; given back on drop.
struct SourceSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(
        map: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        max: usize,
    ) -> Option<SourceSlot> {
        let mut m = map.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// What the gRPC services learn about the connection a request came on (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    activity: Arc<Activity>,
}

/// Whether a connection is in use: streams open, and the time of the last authorized request.
#[derive(Debug)]
struct Activity {
    streams: AtomicUsize,
    last: Mutex<Instant>,
}

impl ConnInfo {
    /// Counts `stream` as keeping the connection busy until the returned guard is dropped.
    pub fn stream_opened(&self) -> StreamInUse {
        self.activity.streams.fetch_add(1, Ordering::AcqRel);
        StreamInUse(self.activity.clone())
    }
}

/// An open long-lived stream on a connection; the connection is not idle while one exists.
#[derive(Debug)]
pub struct StreamInUse(Arc<Activity>);

impl Drop for StreamInUse {
    fn drop(&mut self) {
        *self.0.last.lock() = Instant::now();
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection `req` came on, when it came through [`serve`].
pub fn conn_info<T>(req: &tonic::Request<T>) -> Option<&ConnInfo> {
    req.extensions().get::<ConnInfo>()
}

/// Records an authorized request on its connection (it keeps the connection from being idle). Call it from
/// each service's authorization check once the caller is known.
pub fn mark_request<T>(req: &tonic::Request<T>) {
    if let Some(c) = conn_info(req) {
        *c.activity.last.lock() = Instant::now();
    }
}

/// Resolves when the connection has been idle for `timeout`.
async fn idle_for(activity: Arc<Activity>, timeout: Duration) {
    loop {
        let deadline = *activity.last.lock() + timeout;
        tokio::time::sleep_until(deadline).await;
        if activity.streams.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(timeout).await;
            continue;
        }
        if *activity.last.lock() + timeout <= Instant::now() {
            return;
        }
    }
}

/// A TLS connection as the HTTP/2 server sees it: it holds its connection slot, and reads end (EOF) once it
/// is idle or the server closes everything at the drain deadline.
struct Conn {
    tls: TlsStream<TcpStream>,
    info: ConnInfo,
    ended: Pin<Box<dyn Future<Output = ()> + Send>>,
    closed: bool,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn new(
        tls: TlsStream<TcpStream>,
        remote: SocketAddr,
        slot: OwnedSemaphorePermit,
        idle_timeout: Duration,
        mut closing: watch::Receiver<bool>,
    ) -> Conn {
        let activity = Arc::new(Activity {
            streams: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        });
        let idle = idle_for(activity.clone(), idle_timeout);
        let ended = Box::pin(async move {
            tokio::select! {
                _ = closing.wait_for(|c| *c) => {}
                _ = idle => tracing::debug!(%remote, "control plane: idle connection closed"),
            }
        });
        Conn {
            tls,
            info: ConnInfo { remote, activity },
            ended,
            closed: false,
            _slot: slot,
        }
    }

    fn poll_ended(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed && self.ended.as_mut().poll(cx).is_ready() {
            self.closed = true;
        }
        self.closed
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.poll_ended(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.poll_ended(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| source_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(key("10.0.0.1"), "10.0.0.1");
    }
}
