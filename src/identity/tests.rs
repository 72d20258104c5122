//! Tests for the CAs: what every issued leaf must look like (for the RSA PKCS#1 and ECDSA
//! intermediate plug-in CAs in `testdata/` and for the built-in CA), and the errors for broken
//! plug-in CA directories. `CertManager` tests live in `manager/tests.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use rustls_pki_types::PrivateKeyDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::plugin::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE};
use super::signer::{read_certs, verify};
use super::*;

const TTL: Duration = Duration::from_secs(24 * 3600);

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/identity/testdata")
        .join(name)
}

fn productpage() -> Identity {
    "spiffe://cluster.local/ns/default/sa/productpage"
        .parse()
        .unwrap()
}

/// Everything an Istio peer expects of a workload leaf.
fn assert_istio_leaf(cert: &WorkloadCert, id: &Identity) {
    assert_eq!(&cert.identity, id);
    verify(cert, SystemTime::now()).expect("leaf does not chain to the roots");

    let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    assert_eq!(leaf.subject().iter().count(), 0, "subject not empty");
    let san = leaf.subject_alternative_name().unwrap().expect("no SAN");
    assert!(san.critical, "SAN not critical with an empty subject");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(&id.to_string())]
    );
    let basic = leaf
        .basic_constraints()
        .unwrap()
        .expect("no basicConstraints");
    assert!(!basic.value.ca);
    let usage = leaf.key_usage().unwrap().expect("no keyUsage").value;
    assert!(usage.digital_signature() && usage.key_encipherment());
    assert!(!usage.key_cert_sign());
    let eku = leaf
        .extended_key_usage()
        .unwrap()
        .expect("no extendedKeyUsage")
        .value;
    assert!(eku.server_auth && eku.client_auth);

    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(
        leaf.validity().not_before.timestamp(),
        secs(cert.not_before)
    );
    assert_eq!(leaf.validity().not_after.timestamp(), secs(cert.not_after));

    assert!(
        matches!(cert.key, PrivateKeyDer::Pkcs8(_)),
        "key not PKCS#8"
    );
    let key = KeyPair::from_der_and_sign_algo(&cert.key, &rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("key is not ECDSA P-256");
    assert_eq!(
        key.public_key_raw(),
        leaf.public_key().subject_public_key.data.as_ref(),
        "key does not match the leaf"
    );
}

async fn fetch(source: &dyn CertSource) -> WorkloadCert {
    source.fetch(&productpage()).await.unwrap()
}

#[tokio::test]
async fn rsa_pkcs1_plugin_ca_issues_verifiable_leaves() {
    let dir = testdata("rsa-root");
    let ca = PluginCa::load(&dir, TTL).unwrap();
    let cert = fetch(&ca).await;
    assert_istio_leaf(&cert, &productpage());
    // No cert-chain.pem: the chain is the leaf and ca-cert.pem.
    let ca_cert = read_certs(&dir.join(CA_CERT_FILE)).unwrap();
    assert_eq!(cert.chain[1..], ca_cert[..]);
    assert_eq!(cert.roots, read_certs(&dir.join(ROOT_CERT_FILE)).unwrap());
    assert_eq!(ca.roots(), &cert.roots[..]);
}

#[tokio::test]
async fn ecdsa_intermediate_plugin_ca_issues_verifiable_leaves() {
    let dir = testdata("ecdsa-intermediate");
    let ca = PluginCa::load(&dir, TTL).unwrap();
    let cert = fetch(&ca).await;
    assert_istio_leaf(&cert, &productpage());
    let chain = read_certs(&dir.join(CERT_CHAIN_FILE)).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(cert.chain[1..], chain[..]);
    assert_eq!(cert.roots, read_certs(&dir.join(ROOT_CERT_FILE)).unwrap());
}

#[tokio::test]
async fn builtin_ca_issues_verifiable_leaves_signed_by_its_root() {
    let state = tempfile::tempdir().unwrap();
    let ca = BuiltinCa::load_or_create(state.path(), TTL).unwrap();
    let cert = fetch(&ca).await;
    assert_istio_leaf(&cert, &productpage());
    assert_eq!(cert.chain.len(), 1);
    assert_eq!(cert.roots, ca.roots());

    let (_, root) = X509Certificate::from_der(&cert.roots[0]).unwrap();
    assert_eq!(
        root.subject().to_string(),
        "O=meshnode, CN=meshnode root CA"
    );
    assert!(root.is_ca());
}

#[tokio::test]
async fn leaves_live_for_the_ttl_with_one_minute_backdating() {
    let ca = BuiltinCa::ephemeral(TTL).unwrap();
    let before = SystemTime::now();
    let cert = fetch(&ca).await;
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    // Whole-second truncation of both ends can move the length by at most one second.
    let expected = TTL + Duration::from_secs(60);
    assert!(
        lifetime.abs_diff(expected) <= Duration::from_secs(1),
        "{lifetime:?}"
    );
    assert!(cert.not_before <= before);
    assert_eq!(
        cert.refresh_at(),
        cert.not_before + lifetime / 2,
        "refresh not at half-life"
    );
    assert!(!cert.is_expired(SystemTime::now()));
    assert!(cert.is_expired(cert.not_after));
}

#[test]
fn explicitly_dated_leaves_can_be_already_expired() {
    let ca = BuiltinCa::ephemeral(TTL).unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert = ca
        .issue(&productpage(), now - 2 * hour, now - hour)
        .unwrap();
    assert!(cert.is_expired(now));
    assert!(matches!(
        verify(&cert, now),
        Err(webpki::Error::CertExpired { .. })
    ));
    // And verifies in its own window.
    verify(&cert, now - hour - hour / 2).unwrap();

    assert!(matches!(
        ca.issue(&productpage(), now, now),
        Err(Error::Validity { .. })
    ));
}

#[test]
fn leaves_from_another_ca_do_not_chain_to_our_roots() {
    let ours = BuiltinCa::ephemeral(TTL).unwrap();
    let theirs = BuiltinCa::ephemeral(TTL).unwrap();
    let now = SystemTime::now();
    let mut cert = theirs.issue(&productpage(), now, now + TTL).unwrap();
    cert.roots = ours.roots().to_vec();
    let err = verify(&cert, now).unwrap_err();
    // Both roots have the same subject, so webpki finds "ours" and the signature check fails.
    assert!(
        matches!(
            err,
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey
        ),
        "{err:?}"
    );
}

/// Copies a fixture into a temporary directory, lets `breakage` damage it, and loads it.
fn load_broken(fixture: &str, breakage: impl FnOnce(&Path)) -> (tempfile::TempDir, Error) {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(testdata(fixture)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    breakage(tmp.path());
    let err = PluginCa::load(tmp.path(), TTL).expect_err("broken CA directory accepted");
    (tmp, err)
}

fn assert_names(err: &Error, path: &Path) {
    let message = err.to_string();
    assert!(
        message.contains(&*path.to_string_lossy()),
        "error does not name {}: {message}",
        path.display()
    );
}

const GARBAGE: &str = "this is not a certificate\n";
const BAD_BASE64: &str = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
const NOT_DER: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

#[test]
fn missing_plugin_files_are_named() {
    for file in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE] {
        let (dir, err) = load_broken("ecdsa-intermediate", |d| {
            std::fs::remove_file(d.join(file)).unwrap()
        });
        assert!(matches!(err, Error::Read { .. }), "{file}: {err}");
        assert_names(&err, &dir.path().join(file));
    }
    let err = PluginCa::load(Path::new("/nonexistent/cacerts"), TTL).unwrap_err();
    assert_names(&err, Path::new("/nonexistent/cacerts/ca-cert.pem"));
}

#[test]
fn garbage_plugin_files_are_named() {
    for file in [CA_CERT_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE, CA_KEY_FILE] {
        for (content, what) in [(GARBAGE, "no PEM"), (BAD_BASE64, "bad base64")] {
            let (dir, err) = load_broken("ecdsa-intermediate", |d| {
                std::fs::write(d.join(file), content).unwrap()
            });
            let expected = match what {
                "no PEM" => matches!(err, Error::NoPemSection { .. }),
                _ => matches!(err, Error::Pem { .. }),
            };
            assert!(expected, "{file} with {what}: {err}");
            assert_names(&err, &dir.path().join(file));
        }
        if file != CA_KEY_FILE {
            let (dir, err) = load_broken("ecdsa-intermediate", |d| {
                std::fs::write(d.join(file), NOT_DER).unwrap()
            });
            assert!(matches!(err, Error::Certificate { .. }), "{file}: {err}");
            assert_names(&err, &dir.path().join(file));
        }
    }
}

#[test]
fn empty_cert_chain_falls_back_to_ca_cert() {
    let tmp = tempfile::tempdir().unwrap();
    for file in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE] {
        std::fs::copy(
            testdata("ecdsa-intermediate").join(file),
            tmp.path().join(file),
        )
        .unwrap();
    }
    std::fs::write(tmp.path().join(CERT_CHAIN_FILE), "\n").unwrap();
    let ca = PluginCa::load(tmp.path(), TTL).unwrap();
    let now = SystemTime::now();
    let cert = ca.issue(&productpage(), now, now + TTL).unwrap();
    assert_eq!(
        cert.chain[1..],
        read_certs(&tmp.path().join(CA_CERT_FILE)).unwrap()[..]
    );
    assert_istio_leaf(&cert, &productpage());
}

#[test]
fn a_key_that_does_not_match_ca_cert_is_refused() {
    // Same algorithm, other key.
    let (dir, err) = load_broken("rsa-root", |d| {
        std::fs::copy(testdata("other-rsa-key.pem"), d.join(CA_KEY_FILE)).unwrap();
    });
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    assert_names(&err, &dir.path().join(CA_KEY_FILE));
    assert_names(&err, &dir.path().join(CA_CERT_FILE));

    // Other algorithm: an EC key for an RSA certificate, and the reverse.
    let (_, err) = load_broken("rsa-root", |d| {
        std::fs::copy(
            testdata("ecdsa-intermediate/ca-key.pem"),
            d.join(CA_KEY_FILE),
        )
        .unwrap();
    });
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    let (_, err) = load_broken("ecdsa-intermediate", |d| {
        std::fs::copy(testdata("rsa-root/ca-key.pem"), d.join(CA_KEY_FILE)).unwrap();
    });
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
}

#[test]
fn roots_that_do_not_anchor_the_ca_are_refused() {
    let (dir, err) = load_broken("ecdsa-intermediate", |d| {
        std::fs::copy(testdata("rsa-root/root-cert.pem"), d.join(ROOT_CERT_FILE)).unwrap();
    });
    assert!(matches!(err, Error::ChainDoesNotVerify { .. }), "{err}");
    assert_names(&err, &dir.path().join(ROOT_CERT_FILE));
}

#[test]
fn a_leaf_certificate_is_not_accepted_as_ca_cert() {
    let ca = BuiltinCa::ephemeral(TTL).unwrap();
    let now = SystemTime::now();
    let leaf = ca.issue(&productpage(), now, now + TTL).unwrap();
    let (dir, err) = load_broken("rsa-root", |d| {
        let key_der = leaf.key.secret_der();
        let key =
            KeyPair::from_der_and_sign_algo(&leaf.key, &rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(key.serialized_der(), key_der);
        std::fs::write(d.join(CA_KEY_FILE), key.serialize_pem()).unwrap();
        let cert_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64(&leaf.chain[0])
        );
        std::fs::write(d.join(CA_CERT_FILE), cert_pem).unwrap();
    });
    assert!(matches!(err, Error::NotCa { .. }), "{err}");
    assert_names(&err, &dir.path().join(CA_CERT_FILE));
}

#[test]
fn a_too_short_ttl_is_refused() {
    let err = PluginCa::load(&testdata("rsa-root"), Duration::from_millis(10)).unwrap_err();
    assert!(matches!(err, Error::TtlTooShort { .. }), "{err}");
    let state = tempfile::tempdir().unwrap();
    let err = BuiltinCa::load_or_create(state.path(), Duration::ZERO).unwrap_err();
    assert!(matches!(err, Error::TtlTooShort { .. }), "{err}");
    assert!(!state.path().join("ca").exists(), "root created anyway");
}

/// Standard base64 (with padding) for writing PEM in tests.
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}
