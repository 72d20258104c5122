//! The certificate handed to TLS, and the trait for anything that can mint one.
//!
//! Input: nothing (plain data + trait). Output: [`WorkloadCert`] (leaf chain, PKCS#8 key, trust
//! roots, validity) and [`CertSource`], implemented by `PluginCa`, `BuiltinCa` and test fakes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{Error, Identity, TrustBundle};

/// A boxed, sendable future (what [`CertSource::fetch`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that can produce a certificate for an identity: a local CA, or later a remote one.
pub trait CertSource: Send + Sync + 'static {
    /// Mints (or fetches) a fresh certificate for `id`.
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>>;

    /// Roots to trust for peers besides those of each fetched certificate (the configured
    /// `CA_ROOT_CA` bundle of a remote CA). None by default: a local CA's roots are complete.
    fn trust_bundle(&self) -> Option<TrustBundle> {
        None
    }
}

/// A workload certificate with its key and the roots its peers must chain to.
pub struct WorkloadCert {
    /// The identity in the leaf's only URI SAN.
    pub identity: Identity,
    /// Leaf first, then intermediates up to (possibly including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key: PKCS#8, ECDSA P-256.
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors that peers' certificates must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    /// The leaf's `notBefore`.
    pub not_before: SystemTime,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// When to fetch a replacement: half-way through the validity window.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    /// Whether the certificate is no longer valid at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

/// Never prints the key.
impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("chain_len", &self.chain.len())
            .field("roots_len", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}
