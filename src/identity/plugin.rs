//! `PluginCa`: signs workload certificates with istiod's "cacerts" plug-in CA.
//!
//! Input: the `CA_CERTS_DIR` directory in istiod's layout — `ca-cert.pem` (signing cert, root or
//! intermediate), `ca-key.pem` (its key: PKCS#8, PKCS#1 RSA or SEC1 EC PEM), `root-cert.pem`
//! (one or more roots) and optionally `cert-chain.pem` (ca-cert up to the root).
//! Output: [`WorkloadCert`]s whose chain is `[leaf] + cert-chain.pem` (or `[leaf, ca-cert]` when
//! `cert-chain.pem` is missing or empty) and whose roots are `root-cert.pem`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use super::signer::{CaFiles, Signer};
use super::{BoxFuture, CertSource, Error, Identity, WorkloadCert};

/// The signing certificate, in istiod's plug-in layout.
pub(crate) const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing certificate's private key.
pub(crate) const CA_KEY_FILE: &str = "ca-key.pem";
/// The trust roots.
pub(crate) const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The chain from the signing certificate up to the root (optional).
pub(crate) const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// A CA loaded from an istiod plug-in CA directory.
pub struct PluginCa {
    signer: Signer,
}

impl PluginCa {
    /// Loads and checks the CA in `dir`; issued leaves live for `ttl`.
    ///
    /// Every missing, malformed or mismatched file gives an [`Error`] naming it. As a last check
    /// a test leaf is issued and verified against `root-cert.pem`.
    pub fn load(dir: &Path, ttl: Duration) -> Result<Self, Error> {
        let files = CaFiles {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
            chain: Some(dir.join(CERT_CHAIN_FILE)),
            roots: dir.join(ROOT_CERT_FILE),
        };
        let signer = Signer::load(&files, ttl)?;
        tracing::info!(dir = %dir.display(), "loaded plug-in CA");
        Ok(Self { signer })
    }

    /// Issues a leaf for `id` valid from `not_before` to `not_after` (whole seconds).
    pub fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, Error> {
        self.signer.issue(id, not_before, not_after)
    }

    /// The loaded signer (CSR signing for the CA service).
    pub(crate) fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The roots from `root-cert.pem`.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        self.signer.roots()
    }
}

/// Never prints the key.
impl std::fmt::Debug for PluginCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginCa")
            .field("roots", &self.roots().len())
            .finish_non_exhaustive()
    }
}

impl CertSource for PluginCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>> {
        Box::pin(async move { self.signer.issue_now(id) })
    }
}
