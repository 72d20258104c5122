//! Who gets what from `meshnode control-plane` (:15012): the CA's token rules (istiod's: a caller gets its
//! own identity; a node proxy gets its pods' identities only with `ImpersonatedIdentity`), tokens kept as
//! SHA-256 hashes and with an expiry, xDS only for node proxy tokens, and each token's stream quota. Driven
//! through `control_plane::run` on a loopback listener with plain tonic clients.

mod support;

use std::time::{Duration, Instant};

use meshnode::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use meshnode::proto::ca::IstioCertificateRequest;
use meshnode::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshnode::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use support::control_plane::Plane;
use tonic::Code;

const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";

/// printf %s hashed-token | sha256sum
const HASHED_TOKEN_SHA256: &str =
    "550643f45e135491c47bea94823b37278d5dd91375b285d44001d005d1603a33";

fn mesh() -> String {
    format!(
        "namespaces: {{default: {{}}}}
workloads:
- {{name: a, namespace: default, serviceAccount: a, ips: [10.0.0.1], node: node-1}}
- {{name: b, namespace: default, serviceAccount: b, ips: [10.0.0.2], node: node-2}}
tokens:
- {{token: node-1-token, nodeProxy: true, node: node-1}}
- {{token: nodeless-token, nodeProxy: true}}
- {{token: a-token, namespace: default, serviceAccount: a}}
- {{tokenSha256: {HASHED_TOKEN_SHA256}, nodeProxy: true, node: node-2}}
- {{token: expired-token, nodeProxy: true, node: node-1, expires: 2020-01-01T00:00:00Z}}
"
    )
}

async fn start() -> Plane {
    Plane::start(&mesh()).await
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// CreateCertificate for `sa` with `token`, on a workload's behalf (`ImpersonatedIdentity`) or not.
async fn certificate(
    p: &Plane,
    token: &str,
    sa: &str,
    on_behalf: bool,
) -> Result<(), tonic::Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(spiffe(sa)).unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let metadata = on_behalf.then(|| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(spiffe(sa))),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let chain = IstioCertificateServiceClient::new(p.channel.clone())
        .create_certificate(req)
        .await?
        .into_inner()
        .cert_chain;
    assert!(!chain.is_empty());
    Ok(())
}

fn code(r: Result<(), tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

/// An xDS stream with `token` that asked for addresses: its first response, or the refusal.
/// The request sender, the stream and its first response; the stream stays open while both are held.
type Xds = (
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
    DeltaDiscoveryResponse,
);

async fn xds(p: &Plane, token: &str) -> Result<Xds, tonic::Status> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.9~ztunnel.istio-system~istio-system.svc.cluster.local".into(),
            ..Node::default()
        }),
        type_url: ADDRESS_TYPE.into(),
        ..DeltaDiscoveryRequest::default()
    })
    .await
    .unwrap();
    let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut req = tonic::Request::new(requests);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = AggregatedDiscoveryServiceClient::new(p.channel.clone())
        .delta_aggregated_resources(req)
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an answer within 10 s")?
        .expect("a response");
    Ok((tx, stream, first))
}

#[tokio::test]
async fn a_node_token_gets_its_pods_identities_only_on_their_behalf() {
    let p = start().await;
    assert_eq!(code(certificate(&p, "node-1-token", "a", true).await), None);
    // No ImpersonatedIdentity: istiod would issue the caller's own identity, and this token has none.
    assert_eq!(
        code(certificate(&p, "node-1-token", "a", false).await),
        Some(Code::PermissionDenied)
    );
    // b runs on node-2.
    assert_eq!(
        code(certificate(&p, "node-1-token", "b", true).await),
        Some(Code::PermissionDenied)
    );
    // A workload token still gets its own identity, and only that.
    assert_eq!(code(certificate(&p, "a-token", "a", false).await), None);
    assert_eq!(
        code(certificate(&p, "a-token", "b", false).await),
        Some(Code::PermissionDenied)
    );
}

#[tokio::test]
async fn a_node_token_without_a_node_gets_no_workload_certificates() {
    let p = start().await;
    for sa in ["a", "b"] {
        let err = certificate(&p, "nodeless-token", sa, true)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("node"), "{err:?}");
    }
    // It is still a node proxy token for xDS.
    xds(&p, "nodeless-token").await.unwrap();
}

#[tokio::test]
async fn a_token_kept_as_its_hash_is_accepted_and_an_expired_one_refused() {
    let p = start().await;
    assert_eq!(code(certificate(&p, "hashed-token", "b", true).await), None);
    let err = certificate(&p, "expired-token", "a", true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
    assert_eq!(
        xds(&p, "expired-token").await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn workload_tokens_get_no_xds_stream() {
    let p = start().await;
    let err = xds(&p, "a-token").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node proxy"), "{err:?}");
    assert_eq!(
        xds(&p, "not-a-token").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let (_keep, _stream, first) = xds(&p, "node-1-token").await.unwrap();
    assert_eq!(first.resources.len(), 2, "both pods");
}

#[tokio::test]
async fn one_token_holds_a_few_xds_streams_and_other_tokens_are_still_served() {
    let p = start().await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(xds(&p, "node-1-token").await.unwrap());
    }
    let err = xds(&p, "node-1-token").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    xds(&p, "hashed-token").await.unwrap();
    // A closed stream gives its slot back.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while xds(&p, "node-1-token").await.is_err() {
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_proxy_whose_token_is_removed_from_the_file_loses_its_stream() {
    let p = start().await;
    let (_keep, mut stream, _) = xds(&p, "node-1-token").await.unwrap();
    let (_keep2, mut other, _) = xds(&p, "hashed-token").await.unwrap();
    let without = mesh().replace(
        "- {token: node-1-token, nodeProxy: true, node: node-1}\n",
        "",
    );
    assert_ne!(without, mesh());
    p.write(&without);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the stream outlived its token");
    let status = ended.expect("an error status, not a clean end");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("removed"), "{status:?}");
    // Another token's stream is not ended by the change.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), other.message())
            .await
            .map_or(true, |m| m.is_ok()),
        "another token's stream was ended"
    );
    assert_eq!(
        xds(&p, "node-1-token").await.unwrap_err().code(),
        Code::Unauthenticated
    );
}
