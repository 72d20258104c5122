//! `CaClient`: workload certificates from a remote Istio CA, as ztunnel's `caclient.rs` gets them.
//!
//! Input: a [`GrpcTarget`] (`CA_ADDRESS`, `CA_ROOT_CA`, `ALT_CA_HOSTNAME`, `CA_HEADER_*`), the
//! request [`Credentials`] (`authorization: Bearer` from `AUTH_TOKEN`, re-read per request;
//! `clusterid`), the requested lifetime (`SECRET_TTL`) and whether this is a shared node proxy.
//! Output: [`CertSource::fetch`] → a [`WorkloadCert`] with a fresh ECDSA P-256 key.
//!
//! Each fetch generates a key, sends `/istio.v1.auth.IstioCertificateService/CreateCertificate`
//! with a PEM CSR whose only SAN is the SPIFFE id, `validity_duration` = the TTL in seconds and, in
//! shared mode, `metadata = {"ImpersonatedIdentity": "<id>"}`, and waits at most
//! [`REQUEST_TIMEOUT`]. The answer (`cert_chain`: leaf first, intermediates, then the roots as its last
//! element, which may hold several concatenated PEM certificates while a root rotates) is checked before
//! it is used: every PEM parses, the leaf names exactly `id` and carries our key, it is not expired, and
//! the chain verifies up to one of those roots for client and server use. Anything wrong is an
//! [`Error`] naming the CA and the identity. Rotation and retry are [`super::CertManager`]'s job.
//!
//! Peers are trusted through the answer's roots together with the configured root bundle (`CA_ROOT_CA`,
//! a [`TrustBundle`] re-read when its file changes), which [`CertSource::trust_bundle`] hands to the
//! manager. ztunnel trusts only the answer's roots; meshnode also trusts the bundle so that, during a
//! root rotation, peers whose certificates come from the other root are not refused for up to a
//! certificate lifetime.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::value::Kind;
use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;
use x509_parser::extensions::GeneralName;

use super::signer::{self, check_ttl};
use super::{BoxFuture, CertSource, Error, Identity, TrustBundle, WorkloadCert};
use crate::config::GrpcTarget;
use crate::grpc::{self, Credentials};
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::ca::IstioCertificateRequest;

/// Deadline for one CreateCertificate call (ztunnel: 10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest CA answer decoded. A real chain is a few KiB; this leaves room for long chains while
/// keeping a broken or hostile CA from making us buffer much.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Most certificates accepted in one chain (leaf + intermediates + root).
pub const MAX_CHAIN_LEN: usize = 16;
/// The metadata key a shared node proxy uses to ask for another workload's certificate.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// What is wrong with a CA's answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseProblem {
    /// `cert_chain` is empty.
    #[error("the certificate chain is empty")]
    Empty,
    /// An element of `cert_chain` is not PEM.
    #[error("cert_chain[{index}] is not valid PEM: {source}")]
    Pem {
        /// Position in `cert_chain`.
        index: usize,
        /// What the PEM parser found wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// An element of `cert_chain` holds no certificate.
    #[error("cert_chain[{index}] holds no CERTIFICATE")]
    NoCertificate {
        /// Position in `cert_chain`.
        index: usize,
    },
    /// A certificate does not parse as X.509.
    #[error("certificate #{index} of the chain is not valid X.509: {source}")]
    X509 {
        /// Position in the chain (after splitting PEM bundles), from 0.
        index: usize,
        /// What the X.509 parser found wrong.
        source: x509_parser::error::X509Error,
    },
    /// More certificates than [`MAX_CHAIN_LEN`].
    #[error("the chain holds {count} certificates, more than the {max} accepted")]
    TooLong {
        /// How many there are.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Only a leaf came back; the root must come last.
    #[error("the chain holds only the leaf; the CA must send the root last")]
    NoRoot,
    /// The leaf is not for the identity asked for.
    #[error("the leaf's URI SANs are {found:?}, not exactly the identity asked for")]
    WrongIdentity {
        /// The URI SANs in the leaf.
        found: Vec<String>,
    },
    /// The leaf does not carry the public key of our CSR.
    #[error("the leaf's public key is not the key of our CSR")]
    WrongKey,
    /// The leaf has already expired.
    #[error("the leaf expired at {not_after} (Unix seconds)")]
    Expired {
        /// `notAfter`, seconds since the Unix epoch.
        not_after: i64,
    },
    /// The chain does not verify up to its last certificate.
    #[error("the chain does not verify up to its last certificate: {source}")]
    DoesNotVerify {
        /// What webpki reported.
        source: webpki::Error,
    },
}

/// A [`CertSource`] that asks a remote Istio CA.
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    address: String,
    creds: Credentials,
    ttl: Duration,
    impersonate: bool,
    /// The configured roots (`CA_ROOT_CA`), trusted for peers with each answer's roots.
    bundle: Option<TrustBundle>,
}

impl CaClient {
    /// A client for the CA at `target`, asking for certificates valid for `ttl`. `impersonate`
    /// (shared proxy mode) adds the `ImpersonatedIdentity` metadata to every request. The
    /// connection is made on the first fetch and re-made by itself after failures. `target.root`
    /// (`CA_ROOT_CA`) also becomes the [`TrustBundle`] trusted for peers (none for `SYSTEM`); a bundle
    /// that does not parse is an error here.
    pub fn new(
        target: &GrpcTarget,
        creds: Credentials,
        ttl: Duration,
        impersonate: bool,
    ) -> Result<CaClient, Error> {
        check_ttl(ttl)?;
        let channel = grpc::channel(target).map_err(|source| Error::CaChannel {
            address: target.address.clone(),
            source,
        })?;
        let client = IstioCertificateServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let bundle = TrustBundle::from_root_ca(&target.root)?;
        Ok(CaClient {
            client,
            address: target.address.clone(),
            creds,
            ttl,
            impersonate,
            bundle,
        })
    }

    /// One CreateCertificate round trip, checked.
    async fn request(&self, id: &Identity) -> Result<WorkloadCert, Error> {
        let issue_error = |source| Error::Issue {
            identity: id.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(id.to_string()).map_err(issue_error)?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(issue_error)?;

        let metadata = self.impersonate.then(|| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            )]
            .into(),
        });
        let message = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        };
        let mut request = self
            .creds
            .request(message)
            .map_err(|source| Error::CaCredentials {
                identity: id.clone(),
                source,
            })?;
        request.set_timeout(REQUEST_TIMEOUT);
        let mut client = self.client.clone();
        let response =
            match tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(request)).await {
                Err(_) => {
                    return Err(Error::CaTimeout {
                        address: self.address.clone(),
                        identity: id.clone(),
                        after: REQUEST_TIMEOUT,
                    })
                }
                Ok(Err(status)) => {
                    return Err(Error::CaRequest {
                        address: self.address.clone(),
                        identity: id.clone(),
                        code: status.code(),
                        message: status.message().to_string(),
                    })
                }
                Ok(Ok(response)) => response.into_inner(),
            };
        check_answer(id, key, &response.cert_chain).map_err(|problem| Error::CaResponse {
            address: self.address.clone(),
            identity: id.clone(),
            problem,
        })
    }
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("address", &self.address)
            .field("ttl", &self.ttl)
            .field("impersonate", &self.impersonate)
            .finish_non_exhaustive()
    }
}

impl CertSource for CaClient {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>> {
        Box::pin(self.request(id))
    }

    fn trust_bundle(&self) -> Option<TrustBundle> {
        self.bundle.clone()
    }
}

/// Checks a CA answer for `id` (see the module docs) and turns it into a [`WorkloadCert`] with
/// `chain` = leaf + intermediates and `roots` = every certificate of the last element (of the last
/// certificate when the answer is a single element).
pub(crate) fn check_answer(
    id: &Identity,
    key: KeyPair,
    cert_chain: &[String],
) -> Result<WorkloadCert, ResponseProblem> {
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    // How many certificates the last element holds: the roots.
    let mut in_last = 0;
    for (index, pem) in cert_chain.iter().enumerate() {
        let before = certs.len();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|source| ResponseProblem::Pem { index, source })?);
            if certs.len() > MAX_CHAIN_LEN {
                return Err(ResponseProblem::TooLong {
                    count: certs.len(),
                    max: MAX_CHAIN_LEN,
                });
            }
        }
        if certs.len() == before {
            return Err(ResponseProblem::NoCertificate { index });
        }
        in_last = certs.len() - before;
    }
    if certs.is_empty() {
        return Err(ResponseProblem::Empty);
    }
    for (index, cert) in certs.iter().enumerate() {
        signer::parse_x509(cert).map_err(|source| ResponseProblem::X509 { index, source })?;
    }
    if certs.len() < 2 {
        return Err(ResponseProblem::NoRoot);
    }

    let leaf = signer::parse_x509(&certs[0])
        .map_err(|source| ResponseProblem::X509 { index: 0, source })?;
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [id.to_string()] {
        return Err(ResponseProblem::WrongIdentity { found: uris });
    }
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(ResponseProblem::WrongKey);
    }
    let validity = leaf.validity();
    let not_before = unix_time(validity.not_before.timestamp());
    let not_after_secs = validity.not_after.timestamp();
    let not_after = unix_time(not_after_secs);
    let now = SystemTime::now();
    if now >= not_after {
        return Err(ResponseProblem::Expired {
            not_after: not_after_secs,
        });
    }

    // A single element holding leaf and root concatenated: its last certificate is the root.
    let root_count = if cert_chain.len() >= 2 { in_last } else { 1 };
    let roots = certs.split_off(certs.len() - root_count);
    let cert = WorkloadCert {
        identity: id.clone(),
        chain: certs,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        roots,
        not_before,
        not_after,
    };
    signer::verify(&cert, now).map_err(|source| ResponseProblem::DoesNotVerify { source })?;
    Ok(cert)
}

/// Seconds since the epoch as a `SystemTime` (times before 1970 clamp to the epoch).
fn unix_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

#[cfg(test)]
mod tests;
