//! mTLS for HBONE: rustls configurations built from workload certificates, and peer identity checks.
//!
//! Input: a [`WorkloadCert`] (chain, key, roots) and, on the client side, the identities the peer may have.
//! Output: rustls server/client configs that speak exactly what ztunnel speaks — TLS 1.3 only, AES-GCM
//! suites, ALPN `h2`, no SNI, no resumption — and the peer's SPIFFE identity after a handshake.
//! Both sides: the peer's leaf must carry exactly one URI SAN, a SPIFFE workload identity
//! ([`leaf_identity`]); a certificate with none or several is refused.
//! Client side: the server's chain must lead to our roots and its identity must be one expected.
//! Server side: a client certificate is required, must lead to our roots and its identity must be in our own
//! trust domain; otherwise the handshake fails with a TLS alert. [`peer_identity`] then gives the inbound
//! proxy (authorization) that same identity, read by the same function the verifier used.
//! Roots: the [`WorkloadCert`]'s roots, i.e. the CA answer's roots plus the configured trust bundle
//! (`CA_ROOT_CA`) that [`crate::identity::CertManager`] merges in.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::identity::{CertWatch, Identity, WorkloadCert};

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS material could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The certificate or key of an identity is unusable.
    #[error("certificate for {identity} is unusable: {source}")]
    BadCert {
        /// Whose certificate.
        identity: Identity,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// A root certificate is unusable.
    #[error("root certificates for {identity} are unusable: {reason}")]
    BadRoots {
        /// Whose roots.
        identity: Identity,
        /// Why.
        reason: String,
    },
}

/// The crypto provider: ring, with only the TLS 1.3 AES-GCM suites ztunnel offers.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![
                rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
}

/// Everything TLS needs for one version of one identity's certificate, built once per rotation.
pub struct TlsMaterial {
    /// The certificate this was built from.
    pub cert: Arc<WorkloadCert>,
    roots: Arc<RootCertStore>,
    key: Arc<CertifiedKey>,
    server: Arc<ServerConfig>,
}

impl TlsMaterial {
    /// Builds the configs for `cert`.
    pub fn new(cert: Arc<WorkloadCert>) -> Result<TlsMaterial, Error> {
        let identity = cert.identity.clone();
        let bad_cert = |source| Error::BadCert {
            identity: identity.clone(),
            source,
        };
        let mut roots = RootCertStore::empty();
        for root in &cert.roots {
            roots.add(root.clone()).map_err(|e| Error::BadRoots {
                identity: identity.clone(),
                reason: e.to_string(),
            })?;
        }
        if roots.is_empty() {
            return Err(Error::BadRoots {
                identity: identity.clone(),
                reason: "no roots".into(),
            });
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let key = Arc::new(
            CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &provider)
                .map_err(bad_cert)?,
        );

        let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::BadRoots {
                identity: identity.clone(),
                reason: e.to_string(),
            })?;
        let verifier = Arc::new(SameTrustDomain {
            inner,
            trust_domain: identity.trust_domain().to_string(),
        });
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad_cert)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(TlsMaterial {
            cert,
            roots,
            key,
            server: Arc::new(server),
        })
    }

    /// The server config (for :15008).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client config that accepts only a server presenting one of `expected` identities.
    pub fn client_config(&self, expected: Vec<Identity>) -> Arc<ClientConfig> {
        let verifier = Arc::new(ExpectedIdentities {
            roots: self.roots.clone(),
            expected,
            provider: provider(),
        });
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported by the ring provider")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(FixedClientCert(self.key.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.enable_sni = false;
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }
}

/// The server name handed to rustls: ignored (no SNI, no name check), as ztunnel does.
pub fn dummy_server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
}

/// One identity's TLS material, rebuilt when its certificate rotates. Connections already open keep the
/// material they started with.
///
/// Holding one keeps the identity in use: [`crate::identity::CertManager`] releases an identity when the
/// last [`CertWatch`] for it is dropped.
pub struct WorkloadTls {
    rx: CertWatch,
    current: Mutex<Arc<TlsMaterial>>,
}

impl WorkloadTls {
    /// Starts from the certificate currently in `rx` (a [`CertWatch`] from the manager, or a bare
    /// `watch::Receiver` for a certificate nobody rotates).
    pub fn new(rx: impl Into<CertWatch>) -> Result<WorkloadTls, Error> {
        let rx = rx.into();
        let cert = rx.borrow().clone();
        let current = Mutex::new(Arc::new(TlsMaterial::new(cert)?));
        Ok(WorkloadTls { rx, current })
    }

    /// The material for the latest certificate. On a (rare) bad rotated certificate the previous material
    /// keeps being used and the error is logged.
    pub fn current(&self) -> Arc<TlsMaterial> {
        let latest = self.rx.borrow().clone();
        let mut cur = self.current.lock();
        if !Arc::ptr_eq(&cur.cert, &latest) {
            match TlsMaterial::new(latest) {
                Ok(m) => *cur = Arc::new(m),
                Err(e) => {
                    tracing::error!(error = %e, "rotated certificate refused; keeping the previous one")
                }
            }
        }
        cur.clone()
    }
}

/// The SPIFFE identities in a certificate's URI SANs, in order (URIs that are not SPIFFE workload
/// identities are skipped). For diagnostics and tests; peers are judged by [`leaf_identity`].
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<Identity> {
    uri_sans(cert)
        .unwrap_or_default()
        .iter()
        .filter_map(|u| u.parse::<Identity>().ok())
        .collect()
}

/// Why a peer's leaf certificate names no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdentityError {
    /// The leaf, or its subjectAltName extension, does not parse.
    #[error("the leaf certificate or its subjectAltName does not parse")]
    Unreadable,
    /// No URI SAN at all.
    #[error("the leaf certificate carries no URI SAN")]
    NoUriSan,
    /// More than one URI SAN: which one is the peer would be ambiguous.
    #[error("the leaf certificate carries {} URI SANs ({uris:?}); exactly one is allowed", uris.len())]
    SeveralUriSans {
        /// The URI SANs found.
        uris: Vec<String>,
    },
    /// The one URI SAN is not a SPIFFE workload identity.
    #[error("the URI SAN {uri:?} is not a SPIFFE workload identity")]
    NotSpiffe {
        /// The URI SAN.
        uri: String,
    },
}

/// Every URI SAN of `cert`, in order; `None` if the certificate or its SAN extension does not parse.
fn uri_sans(cert: &CertificateDer<'_>) -> Option<Vec<String>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let Some(san) = parsed.subject_alternative_name().ok()? else {
        return Some(Vec::new());
    };
    Some(
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_string()),
                _ => None,
            })
            .collect(),
    )
}

/// The identity a peer's leaf certificate names: its only URI SAN, which must be a SPIFFE workload
/// identity (ztunnel's rule for workload certificates). Both verifiers and [`peer_identity`] use this one
/// function, so the identity checked during the handshake is the identity authorized afterwards.
pub fn leaf_identity(leaf: &CertificateDer<'_>) -> Result<Identity, PeerIdentityError> {
    let mut uris = uri_sans(leaf).ok_or(PeerIdentityError::Unreadable)?;
    match uris.len() {
        0 => Err(PeerIdentityError::NoUriSan),
        1 => {
            let uri = uris.pop().unwrap_or_default();
            uri.parse::<Identity>()
                .map_err(|_| PeerIdentityError::NotSpiffe { uri })
        }
        _ => Err(PeerIdentityError::SeveralUriSans { uris }),
    }
}

/// The peer's identity after a handshake: [`leaf_identity`] of its leaf certificate. The verifiers refuse
/// every certificate for which this is `None`.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    leaf_identity(certs?.first()?).ok()
}

/// The rustls error for a certificate whose identity is refused (the peer sees `access_denied`).
fn identity_refused() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Client-side verifier: chain to our roots (server-auth usage), then the one identity must be expected.
#[derive(Debug)]
struct ExpectedIdentities {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectedIdentities {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match leaf_identity(end_entity) {
            Ok(presented) if self.expected.contains(&presented) => {
                Ok(ServerCertVerified::assertion())
            }
            Ok(presented) => {
                tracing::warn!(%presented, expected = ?self.expected, "peer identity is not one the destination may have");
                Err(identity_refused())
            }
            Err(e) => {
                tracing::warn!(error = %e, expected = ?self.expected, "server certificate refused");
                Err(identity_refused())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server-side verifier: WebPKI client verification against our roots, then the one identity's trust domain.
#[derive(Debug)]
struct SameTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SameTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match leaf_identity(end_entity) {
            Ok(presented) if presented.trust_domain() == self.trust_domain => {
                Ok(ClientCertVerified::assertion())
            }
            Ok(presented) => {
                tracing::warn!(%presented, trust_domain = %self.trust_domain, "client certificate is not from our trust domain");
                Err(identity_refused())
            }
            Err(e) => {
                tracing::warn!(error = %e, "client certificate refused");
                Err(identity_refused())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Always presents the same client certificate.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod tests;
