//! Issuing Istio-compatible workload leaves from a CA key; the part `PluginCa` and `BuiltinCa` share.
//!
//! Inputs: a signing CA certificate and its private key (PEM files, or in memory for generated
//! roots), the chain to append after the leaf, and the trust roots. Loading checks everything it
//! can (PEM, X.509, CA flag, key/cert match, roots usable as anchors, a test leaf verifies) and
//! names the offending file in the error.
//! Output: [`Signer::issue`] → [`WorkloadCert`]: fresh ECDSA P-256 key, empty subject, one critical
//! URI SAN = the SPIFFE id, CA:FALSE, digitalSignature + keyEncipherment, serverAuth + clientAuth,
//! random serial. [`Signer::issue_now`] uses the window `[now - skew, now + ttl]` where
//! `skew = min(1 min, ttl / 10)`, truncated to whole seconds (what X.509 can express).
//! [`Signer::sign_csr`] issues the same leaf for the public key of a PEM PKCS#10 request (whose
//! self-signature must verify and whose only URI SAN must be the id) and returns the chain the
//! Istio CA protocol answers with: leaf, intermediates, root. [`Csr`] parses such requests for
//! the CA service; [`to_pem`] encodes certificates for the answer.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{Error, Identity, WorkloadCert};

/// How far `not_before` is back-dated so that peers whose clocks run a little behind accept a
/// brand-new certificate. Capped at a tenth of the TTL so short test TTLs keep a sane half-life.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// Shortest accepted certificate TTL: X.509 times have one-second resolution.
const MIN_TTL: Duration = Duration::from_secs(1);

/// PEM labels accepted for a CA private key (for error messages).
const KEY_LABELS: &str = "PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY";

/// Where a CA's files are. Used to read them and to name them in errors.
pub(crate) struct CaFiles {
    /// The signing certificate (first certificate in the file is used).
    pub(crate) cert: PathBuf,
    /// Its private key.
    pub(crate) key: PathBuf,
    /// `Some(path)`: certificates appended after the leaf, from `path`; if that file is missing
    /// or empty, the signing certificate alone. `None`: nothing is appended (leaf only).
    pub(crate) chain: Option<PathBuf>,
    /// Trust roots handed out with every leaf.
    pub(crate) roots: PathBuf,
}

/// A loaded CA that issues workload leaves.
pub(crate) struct Signer {
    issuer: Issuer<'static, KeyPair>,
    chain_tail: Vec<CertificateDer<'static>>,
    /// What follows the leaf in a CSR answer: `chain_tail`, then the root it ends at (unless it
    /// already ends with a root).
    response_tail: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    ttl: Duration,
}

impl Signer {
    /// Loads and checks a CA from PEM files, then proves it by verifying a test leaf.
    pub(crate) fn load(files: &CaFiles, ttl: Duration) -> Result<Self, Error> {
        check_ttl(ttl)?;
        let ca_cert = read_certs(&files.cert)?.swap_remove(0);
        let key = read_key(&files.key)?;
        let roots = read_certs(&files.roots)?;
        for (index, root) in roots.iter().enumerate() {
            webpki::anchor_from_trusted_cert(root).map_err(|source| Error::TrustAnchor {
                path: files.roots.clone(),
                index,
                source,
            })?;
        }
        let chain_tail = match &files.chain {
            None => Vec::new(),
            Some(path) => match read_optional_certs(path)? {
                chain if chain.is_empty() => vec![ca_cert.clone()],
                chain => chain,
            },
        };

        let key_pair = key_pair_for_cert(&ca_cert, &files.cert, &key, &files.key)?;
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key_pair).map_err(|source| {
            Error::CaCertUnusable {
                path: files.cert.clone(),
                source,
            }
        })?;
        let signer = Self {
            issuer,
            response_tail: response_tail(&chain_tail, &ca_cert, &roots),
            chain_tail,
            roots,
            ttl,
        };
        signer.self_test(files)?;
        Ok(signer)
    }

    /// A signer for a root generated in memory (trusted: no file checks, no self-test).
    pub(crate) fn from_generated_root(
        root: CertificateDer<'static>,
        key: KeyPair,
        ttl: Duration,
    ) -> Result<Self, Error> {
        check_ttl(ttl)?;
        let issuer =
            Issuer::from_ca_cert_der(&root, key).map_err(|source| Error::CreateRoot { source })?;
        Ok(Self {
            issuer,
            chain_tail: Vec::new(),
            response_tail: vec![root.clone()],
            roots: vec![root],
            ttl,
        })
    }

    /// The trust roots handed out with every leaf.
    pub(crate) fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Issues a leaf valid from `[now - skew, now + ttl]` (see the module docs).
    pub(crate) fn issue_now(&self, id: &Identity) -> Result<WorkloadCert, Error> {
        let (not_before, not_after) = window_from_now(self.ttl);
        self.issue(id, not_before, not_after)
    }

    /// Issues a leaf for `id` with the given validity, truncated to whole seconds.
    pub(crate) fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, Error> {
        let (params, not_before, not_after) = leaf_params(id, not_before, not_after)?;
        let issue_error = |source| Error::Issue {
            identity: id.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_error)?;

        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(cert.der().clone());
        chain.extend(self.chain_tail.iter().cloned());
        Ok(WorkloadCert {
            identity: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: self.roots.clone(),
            not_before,
            not_after,
        })
    }

    /// Signs a PEM certificate signing request for `id`, valid `[now - skew, now + ttl]`.
    ///
    /// The CSR's own signature must verify and its only URI SAN must be `id`; only its public key
    /// is used, everything else in the leaf is what [`Signer::issue`] puts there. Returns the
    /// chain as Istio's CA answers it: leaf, intermediates, and the root last.
    pub(crate) fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        check_ttl(ttl)?;
        let bad = |problem| Error::Csr {
            identity: id.clone(),
            problem,
        };
        let csr = Csr::parse(csr_pem).map_err(bad)?;
        let csr_id = csr.identity().map_err(bad)?;
        if csr_id != *id {
            return Err(bad(CsrProblem::IdentityMismatch {
                csr: csr_id.to_string(),
                requested: id.to_string(),
            }));
        }
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki)
            .map_err(|_| bad(CsrProblem::UnsupportedKey))?;
        let (not_before, not_after) = window_from_now(ttl);
        let (params, _, _) = leaf_params(id, not_before, not_after)?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|source| Error::Issue {
                identity: id.clone(),
                source,
            })?;
        let mut chain = Vec::with_capacity(1 + self.response_tail.len());
        chain.push(cert.der().clone());
        chain.extend(self.response_tail.iter().cloned());
        Ok(chain)
    }

    /// Issues a serving certificate (DNS names and IP addresses as SANs, serverAuth) valid for `ttl`, with a
    /// new ECDSA P-256 key. Returns the PEM chain (leaf, then `response_tail`: intermediates, root) and
    /// the PEM PKCS#8 key.
    pub(crate) fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), Error> {
        check_ttl(ttl)?;
        let probe = Identity::new("control-plane.invalid", "meshnode", "control-plane")
            .expect("constant identity is well-formed");
        let issue_error = |source| Error::Issue {
            identity: probe.clone(),
            source,
        };
        let (not_before, not_after) = window_from_now(ttl);
        let (mut params, _, _) = leaf_params(&probe, not_before, not_after)?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ia5String::try_from(n.clone()).map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(issue_error)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_error)?;
        let mut pem = to_pem(cert.der());
        for c in &self.response_tail {
            pem.push_str(&to_pem(c));
        }
        Ok((pem, key.serialize_pem()))
    }

    /// Issues a throw-away leaf and checks it chains to the roots for both TLS roles.
    fn self_test(&self, files: &CaFiles) -> Result<(), Error> {
        let probe = Identity::new("self-test.invalid", "meshnode", "ca-self-test")
            .expect("constant identity is well-formed");
        let leaf = self.issue_now(&probe)?;
        verify(&leaf, SystemTime::now()).map_err(|source| Error::ChainDoesNotVerify {
            cert: files.cert.clone(),
            roots: files.roots.clone(),
            source,
        })
    }
}

/// The validity window `[now - skew, now + ttl]` (see the module docs).
fn window_from_now(ttl: Duration) -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    let skew = CLOCK_SKEW_ALLOWANCE.min(ttl / 10);
    let not_before = now.checked_sub(skew).unwrap_or(now);
    let not_after = now.checked_add(ttl).unwrap_or(now);
    (not_before, not_after)
}

/// The parameters of a workload leaf for `id` (see the module docs), with the validity window
/// truncated to whole seconds (also returned).
fn leaf_params(
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(CertificateParams, SystemTime, SystemTime), Error> {
    let invalid = || Error::Validity {
        not_before,
        not_after,
    };
    let (not_before, nb) = cert_time(not_before).ok_or_else(invalid)?;
    let (not_after, na) = cert_time(not_after).ok_or_else(invalid)?;
    if not_after <= not_before {
        return Err(invalid());
    }
    let mut params = CertificateParams::default();
    // Empty subject, as Istio leaves have; rcgen then marks the SAN extension critical.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string()).map_err(
        |source| Error::Issue {
            identity: id.clone(),
            source,
        },
    )?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Both: webpki checks serverAuth when we are the client and clientAuth when we serve.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = nb;
    params.not_after = na;
    Ok((params, not_before, not_after))
}

/// `chain_tail` (or the signing certificate when it is empty), then the root the chain ends at,
/// unless its last certificate already is one of `roots`. The root is the one whose subject is
/// the last certificate's issuer, else the first root.
fn response_tail(
    chain_tail: &[CertificateDer<'static>],
    ca_cert: &CertificateDer<'static>,
    roots: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    let mut tail = if chain_tail.is_empty() {
        vec![ca_cert.clone()]
    } else {
        chain_tail.to_vec()
    };
    let Some(last) = tail.last() else {
        return tail;
    };
    if roots.contains(last) {
        return tail;
    }
    let issuer = parse_x509(last).ok().map(|c| c.issuer().as_raw().to_vec());
    let root = roots
        .iter()
        .find(|r| {
            parse_x509(r).ok().map(|c| c.subject().as_raw().to_vec()) == issuer && issuer.is_some()
        })
        .or(roots.first());
    if let Some(root) = root {
        tail.push(root.clone());
    }
    tail
}

/// What is wrong with a certificate signing request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrProblem {
    /// The request carried no CSR.
    #[error("no CSR was sent")]
    Missing,
    /// The CSR is not a PEM `CERTIFICATE REQUEST`.
    #[error("the CSR is not PEM (expected a CERTIFICATE REQUEST section)")]
    NotPem,
    /// The PEM holds something that is not a PKCS#10 request.
    #[error("the CSR is not a valid PKCS#10 certificate request")]
    Malformed,
    /// The CSR is not signed by the key it carries.
    #[error("the CSR's signature does not verify")]
    BadSignature,
    /// The CSR's public key is of a kind we cannot put in a certificate.
    #[error("the CSR's public key algorithm is not supported")]
    UnsupportedKey,
    /// The CSR has no URI subject alternative name.
    #[error("the CSR has no URI SAN (a SPIFFE id is required)")]
    NoUriSan,
    /// The CSR has more than one URI SAN.
    #[error("the CSR has {count} URI SANs; exactly one SPIFFE id is required")]
    SeveralUriSans {
        /// How many there are.
        count: usize,
    },
    /// The URI SAN is not a SPIFFE workload identity.
    #[error("the CSR's URI SAN {uri:?} is not a SPIFFE id (spiffe://<td>/ns/<ns>/sa/<sa>)")]
    NotSpiffe {
        /// The URI.
        uri: String,
    },
    /// The CSR's identity differs from the one the request names.
    #[error("the CSR is for {csr} but the request names {requested}")]
    IdentityMismatch {
        /// The CSR's SPIFFE id.
        csr: String,
        /// The identity named elsewhere (impersonation metadata, or the caller's argument).
        requested: String,
    },
}

/// A parsed CSR whose signature has been verified.
pub(crate) struct Csr {
    /// The DER `SubjectPublicKeyInfo`.
    pub(crate) spki: Vec<u8>,
    /// The URI SANs, in order.
    pub(crate) uris: Vec<String>,
}

impl Csr {
    /// Parses a PEM CSR and verifies its self-signature.
    pub(crate) fn parse(pem: &str) -> Result<Self, CsrProblem> {
        if pem.trim().is_empty() {
            return Err(CsrProblem::Missing);
        }
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| CsrProblem::NotPem)?;
        let (rest, req) =
            X509CertificationRequest::from_der(der.as_ref()).map_err(|_| CsrProblem::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrProblem::Malformed);
        }
        req.verify_signature()
            .map_err(|_| CsrProblem::BadSignature)?;
        let mut uris = Vec::new();
        for ext in req.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push((*uri).to_string());
                    }
                }
            }
        }
        Ok(Self {
            spki: req.certification_request_info.subject_pki.raw.to_vec(),
            uris,
        })
    }

    /// The CSR's one SPIFFE id.
    pub(crate) fn identity(&self) -> Result<Identity, CsrProblem> {
        match self.uris.as_slice() {
            [] => Err(CsrProblem::NoUriSan),
            [uri] => uri
                .parse()
                .map_err(|_| CsrProblem::NotSpiffe { uri: uri.clone() }),
            more => Err(CsrProblem::SeveralUriSans { count: more.len() }),
        }
    }
}

/// PEM text for one DER certificate (64-column base64, as OpenSSL writes it).
pub(crate) fn to_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 0x3f) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Verifies `cert.chain` against `cert.roots` at `at`, for client and for server use.
pub(crate) fn verify(cert: &WorkloadCert, at: SystemTime) -> Result<(), webpki::Error> {
    let leaf = cert.chain.first().ok_or(webpki::Error::BadDer)?;
    let anchors = cert
        .roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()?;
    let time = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default());
    let end_entity = webpki::EndEntityCert::try_from(leaf)?;
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &cert.chain[1..],
            time,
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

/// Fails if `ttl` is below [`MIN_TTL`].
pub(crate) fn check_ttl(ttl: Duration) -> Result<(), Error> {
    if ttl < MIN_TTL {
        return Err(Error::TtlTooShort { ttl, min: MIN_TTL });
    }
    Ok(())
}

/// `t` truncated to whole seconds, as a `SystemTime` and as rcgen wants it; `None` if X.509
/// cannot express it.
fn cert_time(t: SystemTime) -> Option<(SystemTime, OffsetDateTime)> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let odt = OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    Some((UNIX_EPOCH + Duration::from_secs(secs), odt))
}

/// A random positive 127-bit serial with no leading zero byte.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Reads a whole file, naming it on error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads one or more PEM certificates; fails if there are none or any is not X.509.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = parse_certs(path, &read_file(path)?)?;
    if certs.is_empty() {
        return Err(Error::NoPemSection {
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// Like [`read_certs`], but a missing or blank file gives an empty list.
fn read_optional_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let certs = parse_certs(path, &pem)?;
    if certs.is_empty() {
        return Err(Error::NoPemSection {
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            path: path.to_owned(),
            source,
        })?;
    for (index, cert) in certs.iter().enumerate() {
        parse_x509(cert).map_err(|source| Error::Certificate {
            path: path.to_owned(),
            index,
            source,
        })?;
    }
    Ok(certs)
}

pub(crate) fn parse_x509<'a>(
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, x509_parser::error::X509Error> {
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => Ok(cert),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => Err(e),
        Err(x509_parser::nom::Err::Incomplete(_)) => {
            Err(x509_parser::error::X509Error::InvalidCertificate)
        }
    }
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(&read_file(path)?).map_err(|e| match e {
        pem::Error::NoItemsFound => Error::NoPemSection {
            path: path.to_owned(),
            expected: KEY_LABELS,
        },
        source => Error::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// The kinds of CA key we can sign with.
#[derive(Clone, Copy, Debug)]
enum CaKeyKind {
    Rsa,
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl CaKeyKind {
    /// Reads the kind from a certificate's public key, or returns the algorithm OID(s).
    fn of(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, String> {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_PKCS1_RSAENCRYPTION {
            return Ok(Self::Rsa);
        }
        if *alg == OID_SIG_ED25519 {
            return Ok(Self::Ed25519);
        }
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            return match curve {
                Some(c) if c == OID_EC_P256 => Ok(Self::EcdsaP256),
                Some(c) if c == OID_NIST_EC_P384 => Ok(Self::EcdsaP384),
                Some(c) => Err(format!("{alg} with curve {c}")),
                None => Err(format!("{alg} without a named curve")),
            };
        }
        Err(alg.to_id_string())
    }

    fn sign_alg(self) -> &'static SignatureAlgorithm {
        match self {
            Self::Rsa => &rcgen::PKCS_RSA_SHA256,
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rsa => "RSA (SHA-256)",
            Self::EcdsaP256 => "ECDSA P-256",
            Self::EcdsaP384 => "ECDSA P-384",
            Self::Ed25519 => "Ed25519",
        }
    }

    /// The DER contents of the PKCS#8 `AlgorithmIdentifier` SEQUENCE for this kind.
    fn pkcs8_algorithm(self) -> &'static [u8] {
        match self {
            // OID 1.2.840.113549.1.1.1 (rsaEncryption), NULL
            Self::Rsa => &[
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
            ],
            // OID 1.2.840.10045.2.1 (ecPublicKey), OID 1.2.840.10045.3.1.7 (P-256)
            Self::EcdsaP256 => &[
                0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
                0xce, 0x3d, 0x03, 0x01, 0x07,
            ],
            // OID 1.2.840.10045.2.1 (ecPublicKey), OID 1.3.132.0.34 (P-384)
            Self::EcdsaP384 => &[
                0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
                0x00, 0x22,
            ],
            // OID 1.3.101.112 (Ed25519); only ever arrives as PKCS#8 already.
            Self::Ed25519 => &[0x06, 0x03, 0x2b, 0x65, 0x70],
        }
    }
}

/// Loads `key` as a signing key for the certificate `cert`, checking that they belong together.
fn key_pair_for_cert(
    cert: &CertificateDer<'_>,
    cert_path: &Path,
    key: &PrivateKeyDer<'_>,
    key_path: &Path,
) -> Result<KeyPair, Error> {
    let x509 = parse_x509(cert).map_err(|source| Error::Certificate {
        path: cert_path.to_owned(),
        index: 0,
        source,
    })?;
    if !x509.is_ca() {
        return Err(Error::NotCa {
            path: cert_path.to_owned(),
        });
    }
    let spki = x509.public_key();
    let kind = CaKeyKind::of(spki).map_err(|algorithm| Error::UnsupportedKeyAlgorithm {
        path: cert_path.to_owned(),
        algorithm,
    })?;
    let mismatch = || Error::KeyMismatch {
        key: key_path.to_owned(),
        cert: cert_path.to_owned(),
    };
    let pkcs8 = match (key, kind) {
        (PrivateKeyDer::Pkcs8(k), _) => k.secret_pkcs8_der().to_vec(),
        (PrivateKeyDer::Pkcs1(k), CaKeyKind::Rsa) => {
            wrap_pkcs8(kind.pkcs8_algorithm(), k.secret_pkcs1_der())
        }
        (PrivateKeyDer::Sec1(k), CaKeyKind::EcdsaP256 | CaKeyKind::EcdsaP384) => {
            wrap_pkcs8(kind.pkcs8_algorithm(), k.secret_sec1_der())
        }
        _ => return Err(mismatch()),
    };
    let key_pair =
        KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), kind.sign_alg())
            .map_err(|source| match source {
                // ring reports a PKCS#8 key of another algorithm this way.
                rcgen::Error::RingKeyRejected(ref why) if why.contains("WrongAlgorithm") => {
                    mismatch()
                }
                source => Error::KeyUnusable {
                    path: key_path.to_owned(),
                    algorithm: kind.name(),
                    source,
                },
            })?;
    if key_pair.public_key_raw() != spki.subject_public_key.data.as_ref() {
        return Err(mismatch());
    }
    Ok(key_pair)
}

/// `PrivateKeyInfo ::= SEQUENCE { INTEGER 0, AlgorithmIdentifier, OCTET STRING inner }`.
fn wrap_pkcs8(algorithm: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(der_tlv(0x30, algorithm));
    body.extend(der_tlv(0x04, inner));
    der_tlv(0x30, &body)
}

/// One DER tag-length-value with a definite length.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len().to_be_bytes();
    let significant = &len[len.iter().take_while(|b| **b == 0).count()..];
    let mut out = Vec::with_capacity(content.len() + 2 + significant.len());
    out.push(tag);
    match significant {
        [] => out.push(0),
        [b] if *b < 0x80 => out.push(*b),
        _ => {
            out.push(0x80 | significant.len() as u8);
            out.extend_from_slice(significant);
        }
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_short_and_long_forms() {
        assert_eq!(der_tlv(0x04, &[]), vec![0x04, 0x00]);
        assert_eq!(der_tlv(0x04, &[7; 0x7f])[..2], [0x04, 0x7f]);
        assert_eq!(der_tlv(0x04, &[7; 0x80])[..3], [0x04, 0x81, 0x80]);
        assert_eq!(der_tlv(0x04, &[7; 0x1234])[..4], [0x04, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn truncates_validity_to_whole_seconds_and_refuses_pre_1970() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_999);
        let (whole, _) = cert_time(t).unwrap();
        assert_eq!(whole, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert!(cert_time(UNIX_EPOCH - Duration::from_secs(1)).is_none());
    }
}
