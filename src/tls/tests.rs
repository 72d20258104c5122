use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::identity::BuiltinCa;

fn cert(ca: &BuiltinCa, id: &str) -> WorkloadCert {
    let now = SystemTime::now();
    ca.issue(
        &id.parse().unwrap(),
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
    .unwrap()
}

#[test]
fn spiffe_identity_is_read_from_the_certificate() {
    let ca = BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap();
    let c = cert(&ca, "spiffe://cluster.local/ns/default/sa/reviews");
    let ids = spiffe_ids(&c.chain[0]);
    assert_eq!(ids.len(), 1);
    assert_eq!(
        ids[0].to_string(),
        "spiffe://cluster.local/ns/default/sa/reviews"
    );
    assert_eq!(peer_identity(Some(&c.chain)), Some(ids[0].clone()));
    assert_eq!(peer_identity(None), None);
    assert!(spiffe_ids(&CertificateDer::from(vec![1, 2, 3])).is_empty());
}

#[test]
fn configs_speak_tls13_h2_without_sni_or_resumption() {
    let ca = BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap();
    let m = TlsMaterial::new(Arc::new(cert(
        &ca,
        "spiffe://cluster.local/ns/default/sa/a",
    )))
    .unwrap();
    let s = m.server_config();
    assert_eq!(s.alpn_protocols, vec![b"h2".to_vec()]);
    assert_eq!(s.send_tls13_tickets, 0);
    let c = m.client_config(vec![]);
    assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
    assert!(!c.enable_sni);
    let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        suites,
        vec![
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        ]
    );
}

#[test]
fn material_without_roots_is_refused() {
    let ca = BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap();
    let mut c = cert(&ca, "spiffe://cluster.local/ns/default/sa/a");
    c.roots.clear();
    assert!(matches!(
        TlsMaterial::new(Arc::new(c)),
        Err(Error::BadRoots { .. })
    ));
}

// ---- exactly one URI SAN; the identity verified is the identity authorized ----

/// A test root made with rcgen, issuing leaves with whatever URI SANs a test wants.
pub(crate) struct TestRoot {
    pub(crate) cert: rcgen::Certificate,
    pub(crate) issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestRoot {
    pub(crate) fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    pub(crate) fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A leaf carrying `uris` as its URI SANs (the first is recorded as its identity), trusting `roots`.
    pub(crate) fn leaf(&self, uris: &[&str], roots: Vec<CertificateDer<'static>>) -> WorkloadCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        WorkloadCert {
            identity: uris
                .first()
                .and_then(|u| u.parse().ok())
                .unwrap_or_else(|| "spiffe://cluster.local/ns/default/sa/none".parse().unwrap()),
            chain: vec![leaf.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            roots,
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
        }
    }
}

/// What each side of one handshake concluded.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The client's view: the handshake completed (and the server's certificate was accepted).
    pub(crate) client: Result<(), String>,
    /// The server's view: the client's identity as the inbound proxy would authorize it.
    pub(crate) server: Result<Option<Identity>, String>,
}

/// One HBONE-style handshake in memory: `client` expecting `expected` connects to `server`.
pub(crate) async fn handshake(
    server: &TlsMaterial,
    client: &TlsMaterial,
    expected: Vec<Identity>,
) -> Outcome {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
    let connector = tokio_rustls::TlsConnector::from(client.client_config(expected));
    let srv = tokio::spawn(async move {
        let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
        let id = peer_identity(s.get_ref().1.peer_certificates());
        // Let the client see the end of the handshake.
        tokio::io::AsyncWriteExt::write_all(&mut s, b"ok")
            .await
            .map_err(|e| e.to_string())?;
        Ok(id)
    });
    let client = match connector.connect(dummy_server_name(), b).await {
        Ok(mut s) => {
            let mut buf = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let server = srv.await.unwrap();
    Outcome { client, server }
}

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

fn material(cert: WorkloadCert) -> TlsMaterial {
    TlsMaterial::new(Arc::new(cert)).unwrap()
}

#[tokio::test]
async fn a_well_formed_peer_is_accepted_and_authorized_as_its_one_identity() {
    let root = TestRoot::new("root");
    let server = material(root.leaf(&[SERVER], vec![root.der()]));
    let client = material(root.leaf(&[CLIENT], vec![root.der()]));
    let out = handshake(&server, &client, vec![SERVER.parse().unwrap()]).await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), Some(CLIENT.parse().unwrap()));
}

#[tokio::test]
async fn a_client_certificate_with_two_uri_sans_is_refused_at_the_handshake() {
    let root = TestRoot::new("root");
    let server = material(root.leaf(&[SERVER], vec![root.der()]));
    // Both SANs are in our trust domain; which one authorization would see is ambiguous.
    for uris in [[CLIENT, ADMIN], [ADMIN, CLIENT]] {
        let client = material(root.leaf(&uris, vec![root.der()]));
        let out = handshake(&server, &client, vec![SERVER.parse().unwrap()]).await;
        assert!(out.server.is_err(), "server accepted {uris:?}: {out:?}");
    }
    // A foreign trust domain first and ours second: the verifier must not pass on the second SAN
    // while authorization reads the first.
    let client = material(root.leaf(
        &["spiffe://evil.example/ns/default/sa/client", CLIENT],
        vec![root.der()],
    ));
    let out = handshake(&server, &client, vec![SERVER.parse().unwrap()]).await;
    assert!(out.server.is_err(), "{out:?}");
}

#[tokio::test]
async fn a_server_certificate_with_two_uri_sans_is_refused_by_the_client() {
    let root = TestRoot::new("root");
    let client = material(root.leaf(&[CLIENT], vec![root.der()]));
    let server = material(root.leaf(&[ADMIN, SERVER], vec![root.der()]));
    let out = handshake(&server, &client, vec![SERVER.parse().unwrap()]).await;
    assert!(out.client.is_err(), "{out:?}");
}

#[tokio::test]
async fn certificates_without_a_spiffe_uri_san_are_refused_at_the_handshake() {
    let root = TestRoot::new("root");
    let server = material(root.leaf(&[SERVER], vec![root.der()]));
    for uris in [&[][..], &["https://example.com/client"][..]] {
        let client = material(root.leaf(uris, vec![root.der()]));
        let out = handshake(&server, &client, vec![SERVER.parse().unwrap()]).await;
        assert!(out.server.is_err(), "server accepted {uris:?}: {out:?}");
    }
}

#[test]
fn the_identity_of_a_leaf_is_its_one_spiffe_uri_san() {
    let root = TestRoot::new("root");
    let leaf = |uris: &[&str]| root.leaf(uris, vec![]).chain[0].clone();
    assert_eq!(leaf_identity(&leaf(&[CLIENT])), Ok(CLIENT.parse().unwrap()));
    assert_eq!(leaf_identity(&leaf(&[])), Err(PeerIdentityError::NoUriSan));
    assert!(matches!(
        leaf_identity(&leaf(&[CLIENT, ADMIN])),
        Err(PeerIdentityError::SeveralUriSans { uris }) if uris.len() == 2
    ));
    // A non-SPIFFE URI still counts: one SPIFFE SAN next to it is ambiguous too.
    assert!(matches!(
        leaf_identity(&leaf(&[CLIENT, "https://example.com/"])),
        Err(PeerIdentityError::SeveralUriSans { .. })
    ));
    assert!(matches!(
        leaf_identity(&leaf(&["spiffe://cluster.local/not-a-workload"])),
        Err(PeerIdentityError::NotSpiffe { .. })
    ));
    assert_eq!(
        leaf_identity(&CertificateDer::from(vec![1, 2, 3])),
        Err(PeerIdentityError::Unreadable)
    );
    let two = leaf(&[CLIENT, ADMIN]);
    assert_eq!(peer_identity(Some(&[two])), None);
}
