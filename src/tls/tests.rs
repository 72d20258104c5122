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
