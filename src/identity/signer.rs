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

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
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
        let now = SystemTime::now();
        let skew = CLOCK_SKEW_ALLOWANCE.min(self.ttl / 10);
        let not_before = now.checked_sub(skew).unwrap_or(now);
        let not_after = now.checked_add(self.ttl).unwrap_or(now);
        self.issue(id, not_before, not_after)
    }

    /// Issues a leaf for `id` with the given validity, truncated to whole seconds.
    pub(crate) fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, Error> {
        let invalid = || Error::Validity {
            not_before,
            not_after,
        };
        let (not_before, nb) = cert_time(not_before).ok_or_else(invalid)?;
        let (not_after, na) = cert_time(not_after).ok_or_else(invalid)?;
        if not_after <= not_before {
            return Err(invalid());
        }
        let issue_error = |source| Error::Issue {
            identity: id.clone(),
            source,
        };

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_error)?;
        let mut params = CertificateParams::default();
        // Empty subject, as Istio leaves have; rcgen then marks the SAN extension critical.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(id.to_string()).map_err(issue_error)?,
        )];
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

fn parse_x509<'a>(
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
