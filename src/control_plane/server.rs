//! Serving the control plane's gRPC services over TLS on an already-bound listener.
//!
//! Input: a `TcpListener`, a `rustls::ServerConfig` (whose certificate the caller chooses: from the mesh CA
//! in production, [`ServerCert::throwaway`] in tests), a tonic [`Router`] holding the services (ADS from
//! [`router`], plus the CA service added by the caller with `.add_service(..)`), and a shutdown future.
//! Output: connections accepted until shutdown. TLS handshakes run off the accept loop, at most
//! [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]; HTTP/2 keepalive drops dead peers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Router;
use tonic::transport::Server;

use super::ads::AdsServer;

/// TLS handshakes in progress at once; more connections wait in the kernel backlog.
pub const MAX_HANDSHAKES: usize = 256;
/// Time a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the HTTP/2 server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// HTTP/2 keepalive, as ztunnel's client side: a ping every 30 s, 10 s to answer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

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

/// Serves `router` over TLS on `listener` until `shutdown` completes.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: F,
) -> Result<(), Error>
where
    F: Future<Output = ()> + Send,
{
    let (tx, mut rx) = mpsc::channel::<TlsStream<TcpStream>>(ACCEPTED_QUEUE);
    let acceptor = TlsAcceptor::from(tls);
    let accept = tokio::spawn(accept_loop(listener, acceptor, tx));
    let incoming = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|s| s.map(Ok::<_, std::io::Error>))
    });
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    accept.abort();
    Ok(result?)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
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
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(tls).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "control plane: TLS handshake failed")
                }
                Err(_) => tracing::debug!(%peer, "control plane: TLS handshake timed out"),
            }
        });
    }
}
