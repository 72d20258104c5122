//! `CaService` called directly (no network): CSR validation, impersonation metadata, token
//! grants, TTL capping, and the chains `BuiltinCa` and `PluginCa` answer with.

use std::path::PathBuf;

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tonic::Code;

use super::*;
use crate::identity::caclient::check_answer;

const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa).unwrap()
}

/// A CSR with these URI SANs, and its key.
fn csr(uris: &[&str]) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(Ia5String::try_from(*u).unwrap()))
        .collect();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (pem, key)
}

fn service(max_ttl: Duration) -> CaService {
    let ca = Arc::new(BuiltinCa::ephemeral(HOUR).unwrap());
    let auth = TokenAuthenticator::new(
        TD,
        [
            ("node".to_string(), Grant::NodeProxy),
            ("wl".to_string(), Grant::Identity(id("a"))),
        ],
    );
    CaService::new(ca, Arc::new(auth), max_ttl)
}

fn request(
    csr: &str,
    ttl: i64,
    impersonate: Option<prost_types::Value>,
) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: ttl,
        metadata: impersonate.map(|v| prost_types::Struct {
            fields: [(IMPERSONATED_IDENTITY.to_string(), v)].into(),
        }),
    }
}

fn string(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

async fn call(
    svc: &CaService,
    token: Option<&str>,
    req: IstioCertificateRequest,
) -> Result<Vec<String>, Status> {
    let mut req = Request::new(req);
    if let Some(token) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    svc.create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// Flips the last byte of the CSR's DER (inside its signature) and re-encodes it.
fn tamper(pem: &str) -> String {
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    signer::to_pem(&bytes).replace("CERTIFICATE", "CERTIFICATE REQUEST")
}

#[tokio::test]
async fn bad_csrs_are_invalid_argument_naming_the_problem() {
    let svc = service(HOUR);
    let a = id("a").to_string();
    let (good, _) = csr(&[&a]);
    let (two, _) = csr(&[&a, "spiffe://cluster.local/ns/default/sa/b"]);
    let (none, _) = csr(&[]);
    let (http, _) = csr(&["https://example.com/"]);
    let cases = [
        (request("", 0, None), "no CSR"),
        (request("hello", 0, None), "not PEM"),
        (
            request(
                &signer::to_pem(b"junk").replace("CERTIFICATE", "CERTIFICATE REQUEST"),
                0,
                None,
            ),
            "not a valid PKCS#10",
        ),
        (
            request(&tamper(&good), 0, None),
            "signature does not verify",
        ),
        (request(&none, 0, None), "no URI SAN"),
        (request(&two, 0, None), "2 URI SANs"),
        (request(&http, 0, None), "not a SPIFFE id"),
        (
            request(&good, 0, Some(string(&id("b").to_string()))),
            "but the request names",
        ),
        (
            request(&good, 0, Some(prost_types::Value { kind: None })),
            "must be a string",
        ),
    ];
    for (req, expected) in cases {
        let status = call(&svc, Some("node"), req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{expected}: {status:?}"
        );
    }
    call(&svc, Some("node"), request(&good, 0, Some(string(&a))))
        .await
        .expect("the untouched CSR is fine");
}

#[tokio::test]
async fn tokens_decide_which_identities_are_signed() {
    let svc = service(HOUR);
    let for_id = |sa: &str| csr(&[&id(sa).to_string()]).0;
    let foreign = csr(&["spiffe://other.td/ns/default/sa/a"]).0;

    let code = |r: Result<Vec<String>, Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(call(&svc, None, request(&for_id("a"), 0, None)).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(call(&svc, Some("nope"), request(&for_id("a"), 0, None)).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(call(&svc, Some("wl"), request(&for_id("a"), 0, None)).await),
        None
    );
    assert_eq!(
        code(call(&svc, Some("wl"), request(&for_id("b"), 0, None)).await),
        Some(Code::PermissionDenied)
    );
    let on_behalf = |s: &str| Some(string(s));
    assert_eq!(
        code(
            call(
                &svc,
                Some("node"),
                request(&for_id("b"), 0, on_behalf(&id("b").to_string()))
            )
            .await
        ),
        None
    );
    assert_eq!(
        code(
            call(
                &svc,
                Some("node"),
                request(&foreign, 0, on_behalf("spiffe://other.td/ns/default/sa/a"))
            )
            .await
        ),
        Some(Code::PermissionDenied)
    );
}

#[tokio::test]
async fn a_node_token_without_impersonation_metadata_gets_no_workload_certificate() {
    let svc = service(HOUR);
    let (pem, _) = csr(&[&id("b").to_string()]);
    let status = call(&svc, Some("node"), request(&pem, 0, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("ImpersonatedIdentity"),
        "{status:?}"
    );
}

#[tokio::test]
async fn lifetime_is_the_requested_one_capped_at_the_maximum() {
    let svc = service(HOUR);
    let (pem, key) = csr(&[&id("a").to_string()]);
    for (requested, expected) in [(600, 600), (0, 3600), (-5, 3600), (i64::MAX, 3600)] {
        let chain = call(&svc, Some("wl"), request(&pem, requested, None))
            .await
            .unwrap();
        let cert = check_answer(
            &id("a"),
            KeyPair::from_pem(&key.serialize_pem()).unwrap(),
            &chain,
        )
        .unwrap();
        let left = cert
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(
            left <= Duration::from_secs(expected),
            "{requested}: {left:?}"
        );
        assert!(
            left >= Duration::from_secs(expected - 10),
            "{requested}: {left:?}"
        );
    }
}

fn testdata(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/identity/testdata")
        .join(dir)
}

fn certs(path: PathBuf) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn builtin_ca_answers_leaf_then_root() {
    let ca = BuiltinCa::ephemeral(HOUR).unwrap();
    let (pem, key) = csr(&[&id("a").to_string()]);
    let chain = ca.sign_csr(&pem, &id("a"), HOUR).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca.root_pem().replace("\r\n", "\n"));
    let cert = check_answer(&id("a"), key, &chain).unwrap();
    assert_eq!(cert.roots, ca.roots());
}

#[test]
fn plugin_ca_answers_leaf_intermediate_root() {
    let dir = testdata("ecdsa-intermediate");
    let ca = PluginCa::load(&dir, HOUR).unwrap();
    let (pem, key) = csr(&[&id("a").to_string()]);
    let chain = ca.sign_csr(&pem, &id("a"), HOUR).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let cert = check_answer(&id("a"), key, &chain).unwrap();
    assert_eq!(cert.roots, certs(dir.join("root-cert.pem")));
    assert_eq!(cert.chain[1], certs(dir.join("ca-cert.pem"))[0]);

    // A root used directly as the signing CA is not repeated.
    let dir = testdata("rsa-root");
    let ca = PluginCa::load(&dir, HOUR).unwrap();
    let (pem, key) = csr(&[&id("a").to_string()]);
    let chain = ca.sign_csr(&pem, &id("a"), HOUR).unwrap();
    assert_eq!(chain.len(), 2, "leaf, root");
    let cert = check_answer(&id("a"), key, &chain).unwrap();
    assert_eq!(cert.roots, certs(dir.join("root-cert.pem")));
}

#[test]
fn signer_refuses_a_csr_for_another_identity() {
    let ca = BuiltinCa::ephemeral(HOUR).unwrap();
    let (pem, _) = csr(&[&id("a").to_string()]);
    let err = ca.sign_csr(&pem, &id("b"), HOUR).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Csr {
                problem: CsrProblem::IdentityMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn pem_encoding_round_trips() {
    for len in [0usize, 1, 2, 3, 47, 48, 49, 1000] {
        let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let pem = signer::to_pem(&der);
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), &der[..], "{len}");
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
    }
}

#[test]
fn the_control_plane_serving_cert_verifies_for_its_names_against_the_mesh_root() {
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    let ca = BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap();
    let names = vec![
        "istiod.istio-system.svc".to_string(),
        "127.0.0.1".to_string(),
    ];
    let (chain_pem, key_pem) = ca.issue_server(&names, Duration::from_secs(600)).unwrap();
    assert!(key_pem.contains("PRIVATE KEY"));
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile_like(&chain_pem);
    let roots = rustls_pemfile_like(&ca.roots_pem());
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    for name in ["istiod.istio-system.svc", "127.0.0.1"] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .unwrap();
        leaf.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
            .unwrap();
    }
    assert!(leaf
        .verify_is_valid_for_subject_name(&ServerName::try_from("evil.example").unwrap())
        .is_err());
}

fn rustls_pemfile_like(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}
