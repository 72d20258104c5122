//! Workload identities and their certificates.
//!
//! Job: give the TLS and proxy code an up-to-date X.509 certificate for each SPIFFE identity it
//! serves, the way Istio's ztunnel does, so that peers running Istio accept it.
//!
//! Inputs: an [`Identity`] and a [`CertSource`] that can mint certificates for it. Two sources
//! live here: [`PluginCa`] (istiod's "cacerts" plug-in CA directory, `CA_CERTS_DIR`) and
//! [`BuiltinCa`] (a root created once per machine under the state directory).
//! Outputs: [`WorkloadCert`]s (leaf chain, PKCS#8 key, trust roots), published per identity by
//! [`CertManager`] through a `tokio::sync::watch` channel and rotated at half-life.
//!
//! Layout:
//! - [`spiffe`]: the [`Identity`] type (parse/print `spiffe://td/ns/x/sa/y`).
//! - `cert`: [`WorkloadCert`] and the [`CertSource`] trait.
//! - `signer`: issuing Istio-compatible leaves from a CA key; PEM/DER loading shared by both CAs.
//! - `plugin`: [`PluginCa`]. `builtin`: [`BuiltinCa`]. `manager`: [`CertManager`] (rotation, and
//!   releasing identities no one uses any more) and [`CertWatch`].
//! - `bundle`: [`TrustBundle`], the configured root bundle (`CA_ROOT_CA`) trusted with each CA answer.
//! - [`caclient`]: [`CaClient`], a [`CertSource`] asking a remote Istio CA (istiod, or
//!   `meshnode control-plane`) over gRPC, as ztunnel does.
//! - [`ca_server`]: [`CaService`], the Istio CA gRPC service of `meshnode control-plane`, signing
//!   CSRs with a [`CsrSigner`] ([`BuiltinCa`] or [`PluginCa`]) for callers an [`Authenticate`] allows.
//!
//! Owner: the identity module; the TLS code only consumes [`WorkloadCert`]s.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub mod spiffe;
pub use spiffe::Identity;

mod builtin;
mod bundle;
pub mod ca_server;
pub mod caclient;
mod cert;
mod manager;
mod plugin;
mod signer;

pub use builtin::BuiltinCa;
pub use bundle::TrustBundle;
pub use ca_server::{bearer_token, Authenticate, CaService, CsrSigner, Grant, TokenAuthenticator};
pub use caclient::{CaClient, ResponseProblem};
pub use cert::{BoxFuture, CertSource, WorkloadCert};
pub use manager::{CertManager, CertWatch};
pub use plugin::PluginCa;
pub use signer::CsrProblem;

#[cfg(test)]
mod tests;

/// Why a certificate could not be loaded, created or issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file (or directory) could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file or directory could not be created, written or renamed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The path that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file is not well-formed PEM (bad section markers, bad base64).
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        /// The malformed file.
        path: PathBuf,
        /// What the PEM parser found wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// A file holds no PEM section of the kind needed.
    #[error("{} contains no {expected} PEM section", path.display())]
    NoPemSection {
        /// The file.
        path: PathBuf,
        /// The PEM label(s) that were looked for.
        expected: &'static str,
    },
    /// A certificate in a file is not valid X.509.
    #[error("{}: certificate #{index} is not valid X.509: {source}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Position of the certificate in the file, from 0.
        index: usize,
        /// What the X.509 parser found wrong.
        source: x509_parser::error::X509Error,
    },
    /// The signing certificate parses but its subject or extensions cannot be used for issuing.
    #[error("{}: cannot issue certificates under this CA certificate: {source}", path.display())]
    CaCertUnusable {
        /// The certificate file.
        path: PathBuf,
        /// Why rcgen refused it.
        source: rcgen::Error,
    },
    /// The signing certificate does not have `basicConstraints CA:TRUE`.
    #[error("{} is not a CA certificate (basicConstraints CA:TRUE is missing)", path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
    },
    /// The signing certificate's public key is of a kind this CA cannot sign with.
    #[error(
        "{}: unsupported CA key algorithm {algorithm} (supported: RSA, ECDSA P-256/P-384, Ed25519)",
        path.display()
    )]
    UnsupportedKeyAlgorithm {
        /// The certificate file.
        path: PathBuf,
        /// The public key algorithm (and curve) OID, dotted.
        algorithm: String,
    },
    /// The private key is of the right kind but cannot be loaded for signing.
    #[error("{}: cannot use the private key for {algorithm} signing: {source}", path.display())]
    KeyUnusable {
        /// The key file.
        path: PathBuf,
        /// The algorithm the certificate calls for.
        algorithm: &'static str,
        /// Why the crypto library refused it.
        source: rcgen::Error,
    },
    /// The private key is not the key of the signing certificate.
    #[error("{} does not match the public key of {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// A root certificate cannot serve as a trust anchor.
    #[error("{}: certificate #{index} cannot be used as a trust anchor: {source}", path.display())]
    TrustAnchor {
        /// The roots file.
        path: PathBuf,
        /// Position of the certificate in the file, from 0.
        index: usize,
        /// Why webpki refused it.
        source: webpki::Error,
    },
    /// A test leaf issued right after loading the CA does not verify against its roots.
    #[error(
        "certificates signed with {} do not chain to the roots in {}: {source}",
        cert.display(),
        roots.display()
    )]
    ChainDoesNotVerify {
        /// The signing certificate file.
        cert: PathBuf,
        /// The roots file.
        roots: PathBuf,
        /// What webpki reported for the test leaf.
        source: webpki::Error,
    },
    /// The built-in CA's root directory exists but cannot be used. It is left untouched.
    #[error(
        "built-in CA root in {} is unusable and was left untouched (move it away to create a new root): {source}",
        dir.display()
    )]
    BuiltinRoot {
        /// The `<state_dir>/ca` directory.
        dir: PathBuf,
        /// What is wrong with it.
        source: Box<Error>,
    },
    /// A new root key or certificate could not be generated.
    #[error("cannot generate a root CA: {source}")]
    CreateRoot {
        /// The underlying error.
        source: rcgen::Error,
    },
    /// The configured certificate lifetime is too short to be useful.
    #[error("certificate TTL {ttl:?} is shorter than the minimum {min:?}")]
    TtlTooShort {
        /// The TTL asked for.
        ttl: Duration,
        /// The smallest TTL accepted.
        min: Duration,
    },
    /// The requested validity window is empty, before 1970 or after 9999.
    #[error("invalid certificate validity window {not_before:?} .. {not_after:?}")]
    Validity {
        /// Requested start.
        not_before: SystemTime,
        /// Requested end.
        not_after: SystemTime,
    },
    /// Generating the leaf key or signing the leaf failed.
    #[error("cannot issue a certificate for {identity}: {source}")]
    Issue {
        /// The identity the certificate was for.
        identity: Identity,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// A certificate signing request cannot be signed.
    #[error("cannot sign the CSR for {identity}: {problem}")]
    Csr {
        /// The identity asked for.
        identity: Identity,
        /// What is wrong with the CSR.
        problem: CsrProblem,
    },
    /// The connection to a remote CA cannot be set up (bad address, unreadable roots).
    #[error("CA {address}: {source}")]
    CaChannel {
        /// The CA address.
        address: String,
        /// What is wrong.
        source: crate::grpc::Error,
    },
    /// The request credentials (token file, headers) cannot be prepared.
    #[error("certificate request for {identity}: {source}")]
    CaCredentials {
        /// The identity asked for.
        identity: Identity,
        /// What is wrong.
        source: crate::grpc::Error,
    },
    /// The CA could not be reached or refused the request.
    #[error("CA {address} refused or failed the certificate request for {identity} ({code:?}): {message}")]
    CaRequest {
        /// The CA address.
        address: String,
        /// The identity asked for.
        identity: Identity,
        /// The gRPC status code.
        code: tonic::Code,
        /// The gRPC status message.
        message: String,
    },
    /// The CA did not answer in time.
    #[error("CA {address} did not answer the certificate request for {identity} within {after:?}")]
    CaTimeout {
        /// The CA address.
        address: String,
        /// The identity asked for.
        identity: Identity,
        /// The deadline.
        after: Duration,
    },
    /// The CA answered with a certificate chain that cannot be used.
    #[error("CA {address} answered the certificate request for {identity} with an unusable chain: {problem}")]
    CaResponse {
        /// The CA address.
        address: String,
        /// The identity asked for.
        identity: Identity,
        /// What is wrong with the answer.
        problem: ResponseProblem,
    },
}
