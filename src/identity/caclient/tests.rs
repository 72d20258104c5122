//! `CaClient` against a real tonic server on 127.0.0.1: the embedded `CaService` (one test over
//! TLS, the rest plain HTTP/2 for speed), and a fake CA that answers badly in each way a CA can.
//! Also the CA outage: `CertManager` keeps the last good certificate until the CA is back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

use super::*;
use crate::config::{AuthToken, RootCa};
use crate::identity::manager::Timing;
use crate::identity::{Authenticate, BuiltinCa, CaService, CertManager, Grant, TokenAuthenticator};
use crate::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::ca::IstioCertificateResponse;
use crate::tls::tests::{handshake, TestRoot};
use crate::tls::TlsMaterial;

const TD: &str = "cluster.local";
const NODE_TOKEN: &str = "node-token";
const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa).unwrap()
}

/// Records what each request carried, then asks a [`TokenAuthenticator`].
struct Recorder {
    inner: TokenAuthenticator,
    seen: Mutex<Vec<(Option<String>, Identity, bool)>>,
}

impl Recorder {
    fn new(tokens: Vec<(String, Grant)>) -> Arc<Self> {
        Arc::new(Self {
            inner: TokenAuthenticator::new(TD, tokens),
            seen: Mutex::new(Vec::new()),
        })
    }

    fn seen(&self) -> Vec<(Option<String>, Identity, bool)> {
        self.seen.lock().clone()
    }
}

impl Authenticate for Recorder {
    fn authorize(
        &self,
        token: Option<&str>,
        requested: &Identity,
        impersonating: bool,
    ) -> Result<(), Status> {
        self.seen
            .lock()
            .push((token.map(str::to_string), requested.clone(), impersonating));
        self.inner.authorize(token, requested, impersonating)
    }
}

/// A running test server; dropping it does not stop it, `stop` does.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

async fn serve<S: IstioCertificateService>(
    service: IstioCertificateServiceServer<S>,
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
) -> Running {
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    let router = builder.add_service(service);
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// The embedded CA service with a built-in CA in `state`, signing at most `max_ttl`.
fn ca_service(
    state: &std::path::Path,
    auth: Arc<Recorder>,
    max_ttl: Duration,
) -> (Arc<BuiltinCa>, CaService) {
    let ca = Arc::new(BuiltinCa::load_or_create(state, HOUR).unwrap());
    (ca.clone(), CaService::new(ca, auth, max_ttl))
}

fn target(addr: SocketAddr) -> GrpcTarget {
    GrpcTarget {
        address: format!("http://{addr}"),
        root: RootCa::System,
        alt_hostname: None,
        headers: vec![],
    }
}

fn creds(token: AuthToken) -> Credentials {
    Credentials::new(token, "Kubernetes".into(), vec![])
}

fn literal(token: &str) -> Credentials {
    creds(AuthToken::Literal(token.into()))
}

/// A server certificate for 127.0.0.1 signed by a fresh test root; returns the TLS config and
/// the root (PEM) clients must trust.
fn server_tls() -> (ServerTlsConfig, String) {
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
    (ServerTlsConfig::new().identity(identity), root.pem())
}

#[tokio::test]
async fn certificate_from_the_embedded_ca_over_tls_is_usable_for_mtls() {
    let state = tempfile::tempdir().unwrap();
    let auth = Recorder::new(vec![(NODE_TOKEN.into(), Grant::NodeProxy)]);
    let (ca, service) = ca_service(state.path(), auth.clone(), HOUR);
    let (tls, root_pem) = server_tls();
    let server = serve(service.into_server(), listener().await, Some(tls)).await;
    let target = GrpcTarget {
        address: format!("https://{}", server.addr),
        root: RootCa::Pem(root_pem),
        alt_hostname: None,
        headers: vec![],
    };
    let client = CaClient::new(&target, literal(NODE_TOKEN), HOUR, true).unwrap();

    let cert = client.fetch(&id("productpage")).await.unwrap();
    assert_eq!(cert.identity, id("productpage"));
    assert_eq!(cert.chain.len(), 1, "leaf only; the root goes to roots");
    assert_eq!(cert.roots, ca.roots());
    assert_eq!(
        crate::tls::spiffe_ids(&cert.chain[0]),
        vec![id("productpage")]
    );
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(cert));
    crate::tls::WorkloadTls::new(rx).expect("TLS accepts the certificate");
    assert!(
        client.trust_bundle().is_some(),
        "CA_ROOT_CA given as PEM is trusted for peers too"
    );
    // Shared mode: the request carried the node's token and the impersonation metadata.
    assert_eq!(
        auth.seen(),
        vec![(Some(NODE_TOKEN.into()), id("productpage"), true)]
    );
    server.stop().await;
}

#[tokio::test]
async fn dedicated_mode_sends_no_impersonation_metadata() {
    let state = tempfile::tempdir().unwrap();
    let auth = Recorder::new(vec![("wl".into(), Grant::Identity(id("reviews")))]);
    let (_ca, service) = ca_service(state.path(), auth.clone(), HOUR);
    let server = serve(service.into_server(), listener().await, None).await;
    let client = CaClient::new(&target(server.addr), literal("wl"), HOUR, false).unwrap();
    client.fetch(&id("reviews")).await.unwrap();
    assert_eq!(auth.seen(), vec![(Some("wl".into()), id("reviews"), false)]);
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_token_file_is_used_on_the_next_request() {
    let state = tempfile::tempdir().unwrap();
    let token_file = state.path().join("istio-token");
    std::fs::write(&token_file, "first\n").unwrap();
    let auth = Recorder::new(vec![
        ("first".into(), Grant::NodeProxy),
        ("second".into(), Grant::NodeProxy),
    ]);
    let (_ca, service) = ca_service(&state.path().join("ca-state"), auth.clone(), HOUR);
    let server = serve(service.into_server(), listener().await, None).await;
    let client = CaClient::new(
        &target(server.addr),
        creds(AuthToken::File(token_file.clone())),
        HOUR,
        true,
    )
    .unwrap();

    client.fetch(&id("a")).await.unwrap();
    std::fs::write(&token_file, "second").unwrap();
    client.fetch(&id("a")).await.unwrap();
    std::fs::write(&token_file, "revoked").unwrap();
    let err = client.fetch(&id("a")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::CaRequest {
                code: Code::Unauthenticated,
                ..
            }
        ),
        "{err}"
    );
    let tokens: Vec<_> = auth.seen().into_iter().map(|(t, _, _)| t).collect();
    assert_eq!(
        tokens,
        [Some("first"), Some("second"), Some("revoked")].map(|t| t.map(String::from))
    );

    std::fs::remove_file(&token_file).unwrap();
    let err = client.fetch(&id("a")).await.unwrap_err();
    assert!(matches!(err, Error::CaCredentials { .. }), "{err}");
    assert!(err.to_string().contains("istio-token"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_token_is_refused_with_a_clear_error() {
    let state = tempfile::tempdir().unwrap();
    let auth = Recorder::new(vec![(NODE_TOKEN.into(), Grant::NodeProxy)]);
    let (_ca, service) = ca_service(state.path(), auth, HOUR);
    let server = serve(service.into_server(), listener().await, None).await;

    for creds in [creds(AuthToken::None), literal("guess")] {
        let client = CaClient::new(&target(server.addr), creds, HOUR, true).unwrap();
        let err = client.fetch(&id("a")).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::CaRequest {
                    code: Code::Unauthenticated,
                    ..
                }
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&id("a").to_string()) && text.contains("token"),
            "{text}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn node_token_gets_any_identity_of_its_trust_domain_workload_token_only_its_own() {
    let state = tempfile::tempdir().unwrap();
    let auth = Recorder::new(vec![
        (NODE_TOKEN.into(), Grant::NodeProxy),
        ("wl".into(), Grant::Identity(id("reviews"))),
    ]);
    let (_ca, service) = ca_service(state.path(), auth, HOUR);
    let server = serve(service.into_server(), listener().await, None).await;
    let node = CaClient::new(&target(server.addr), literal(NODE_TOKEN), HOUR, true).unwrap();
    let workload = CaClient::new(&target(server.addr), literal("wl"), HOUR, false).unwrap();

    node.fetch(&id("reviews")).await.unwrap();
    node.fetch(&id("ratings")).await.unwrap();
    let foreign = Identity::new("other.domain", "default", "x").unwrap();
    let err = node.fetch(&foreign).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::CaRequest {
                code: Code::PermissionDenied,
                ..
            }
        ),
        "{err}"
    );

    workload.fetch(&id("reviews")).await.unwrap();
    let err = workload.fetch(&id("ratings")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::CaRequest {
                code: Code::PermissionDenied,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("may not request"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn requested_lifetime_is_capped_by_the_ca() {
    let state = tempfile::tempdir().unwrap();
    let auth = Recorder::new(vec![(NODE_TOKEN.into(), Grant::NodeProxy)]);
    let (_ca, service) = ca_service(state.path(), auth, Duration::from_secs(600));
    let server = serve(service.into_server(), listener().await, None).await;
    let client = CaClient::new(&target(server.addr), literal(NODE_TOKEN), 24 * HOUR, true).unwrap();
    let cert = client.fetch(&id("a")).await.unwrap();
    let after = cert.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(after <= Duration::from_secs(600), "{after:?}");
    assert!(after >= Duration::from_secs(590), "{after:?}");
    server.stop().await;
}

#[tokio::test]
async fn unreachable_ca_is_an_error_naming_the_identity() {
    let addr = listener().await.local_addr().unwrap(); // bound, then closed again
    let client = CaClient::new(&target(addr), literal(NODE_TOKEN), HOUR, true).unwrap();
    let err = client.fetch(&id("a")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::CaRequest {
                code: Code::Unavailable,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&id("a").to_string()), "{err}");
}

#[tokio::test]
async fn cert_manager_keeps_the_last_good_certificate_through_a_ca_outage() {
    const FAST: Timing = Timing {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        min_refresh_delay: Duration::from_millis(20),
    };
    let state = tempfile::tempdir().unwrap();
    let auth = Recorder::new(vec![(NODE_TOKEN.into(), Grant::NodeProxy)]);
    let ca = Arc::new(BuiltinCa::load_or_create(state.path(), HOUR).unwrap());
    let service = || CaService::new(ca.clone(), auth.clone(), HOUR).into_server();
    let server = serve(service(), listener().await, None).await;
    let addr = server.addr;
    let ttl = Duration::from_secs(3);
    let client = CaClient::new(&target(addr), literal(NODE_TOKEN), ttl, true).unwrap();
    let manager = CertManager::with_timing(Arc::new(client), FAST);

    let mut rx = manager.get(&id("a")).await.unwrap();
    let first = rx.borrow_and_update().clone();
    server.stop().await;

    // Past half-life the refresh fails; the certificate stays published and valid.
    let past_refresh = first
        .refresh_at()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        + Duration::from_millis(500);
    tokio::time::sleep(past_refresh).await;
    assert!(Arc::ptr_eq(&rx.borrow(), &first));
    let now = SystemTime::now();
    assert!(!first.is_expired(now));
    signer::verify(&first, now).expect("still valid during the outage");
    let calls = auth.seen().len();
    assert_eq!(calls, 1, "the CA was down; no request reached it");

    // The CA comes back on the same address: the next retry publishes a new certificate.
    let server = serve(service(), TcpListener::bind(addr).await.unwrap(), None).await;
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a new certificate after the outage")
        .unwrap();
    let second = rx.borrow().clone();
    assert!(second.not_after > first.not_after);
    server.stop().await;
}

/// Ways the fake CA answers.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Good,
    Empty,
    MalformedPem,
    NotX509,
    LeafOnly,
    OtherIdentity,
    OtherKey,
    Expired,
    NotVerifying,
    Oversized,
    /// The last element holds two roots (a root rotation in progress); the leaf is under the first.
    TwoRoots,
}

/// A CA that signs the CSR as told by `answer`.
struct FakeCa {
    answer: Answer,
    root: TestRoot,
    stranger: TestRoot,
}

impl FakeCa {
    fn new(answer: Answer) -> Self {
        Self::with_root(answer, TestRoot::new("fake CA root"))
    }

    fn with_root(answer: Answer, root: TestRoot) -> Self {
        Self {
            answer,
            root,
            stranger: TestRoot::new("stranger root"),
        }
    }

    fn answer(&self, csr: &str) -> Vec<String> {
        let mut req = CertificateSigningRequestParams::from_pem(csr).unwrap();
        let now = time::OffsetDateTime::now_utc();
        req.params.not_before = now - time::Duration::minutes(1);
        req.params.not_after = now + time::Duration::hours(1);
        let mut issuer = &self.root.issuer;
        let root_pem = self.root.cert.pem();
        match self.answer {
            Answer::Empty => return vec![],
            Answer::MalformedPem => {
                return vec!["-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".into()]
            }
            Answer::NotX509 => return vec![signer::to_pem(b"not a certificate"), root_pem],
            Answer::Oversized => return vec!["x".repeat(2 * MAX_RESPONSE_BYTES)],
            Answer::OtherIdentity => {
                req.params.subject_alt_names = vec![SanType::URI(
                    Ia5String::try_from(id("intruder").to_string()).unwrap(),
                )];
            }
            Answer::OtherKey => {
                let other_key = KeyPair::generate().unwrap();
                let leaf = req.params.signed_by(&other_key, issuer).unwrap();
                return vec![leaf.pem(), root_pem];
            }
            Answer::Expired => {
                req.params.not_before = now - time::Duration::hours(2);
                req.params.not_after = now - time::Duration::hours(1);
            }
            Answer::NotVerifying => issuer = &self.stranger.issuer,
            Answer::Good | Answer::LeafOnly | Answer::TwoRoots => {}
        }
        let leaf = req.signed_by(issuer).unwrap().pem();
        match self.answer {
            Answer::LeafOnly => vec![leaf],
            Answer::TwoRoots => vec![leaf, format!("{root_pem}{}", self.stranger.cert.pem())],
            _ => vec![leaf, root_pem],
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let cert_chain = self.answer(&request.get_ref().csr);
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

async fn ask_fake(answer: Answer) -> Result<WorkloadCert, Error> {
    let server = serve_fake(FakeCa::new(answer)).await;
    let client = CaClient::new(&target(server.addr), literal("t"), HOUR, false).unwrap();
    let result = client.fetch(&id("a")).await;
    server.stop().await;
    result
}

async fn serve_fake(ca: FakeCa) -> Running {
    serve(
        IstioCertificateServiceServer::new(ca).max_encoding_message_size(8 * MAX_RESPONSE_BYTES),
        listener().await,
        None,
    )
    .await
}

#[tokio::test]
async fn bad_ca_answers_are_clear_errors_and_a_good_one_is_accepted() {
    let cert = ask_fake(Answer::Good).await.expect("the fake CA works");
    assert_eq!(cert.identity, id("a"));

    let problem = |result: Result<WorkloadCert, Error>| match result {
        Err(err @ Error::CaResponse { .. }) => {
            assert!(err.to_string().contains(&id("a").to_string()), "{err}");
            let Error::CaResponse { problem, .. } = err else {
                unreachable!()
            };
            problem
        }
        other => panic!("expected an unusable answer, got {other:?}"),
    };
    assert!(matches!(
        problem(ask_fake(Answer::Empty).await),
        ResponseProblem::Empty
    ));
    assert!(matches!(
        problem(ask_fake(Answer::MalformedPem).await),
        ResponseProblem::Pem { index: 0, .. }
    ));
    assert!(matches!(
        problem(ask_fake(Answer::NotX509).await),
        ResponseProblem::X509 { index: 0, .. }
    ));
    assert!(matches!(
        problem(ask_fake(Answer::LeafOnly).await),
        ResponseProblem::NoRoot
    ));
    match problem(ask_fake(Answer::OtherIdentity).await) {
        ResponseProblem::WrongIdentity { found } => {
            assert_eq!(found, vec![id("intruder").to_string()])
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        problem(ask_fake(Answer::OtherKey).await),
        ResponseProblem::WrongKey
    ));
    assert!(matches!(
        problem(ask_fake(Answer::Expired).await),
        ResponseProblem::Expired { .. }
    ));
    assert!(matches!(
        problem(ask_fake(Answer::NotVerifying).await),
        ResponseProblem::DoesNotVerify { .. }
    ));
}

#[tokio::test]
async fn an_oversized_ca_answer_is_refused_without_buffering_it() {
    let err = ask_fake(Answer::Oversized).await.unwrap_err();
    let Error::CaRequest { code, message, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(*code, Code::OutOfRange, "{err}");
    assert!(message.contains("too large"), "{err}");
}

#[test]
fn a_chain_longer_than_the_limit_is_refused() {
    let root = TestRoot::new("root").cert;
    let chain = vec![root.pem().repeat(MAX_CHAIN_LEN + 1)];
    let err = check_answer(&id("a"), KeyPair::generate().unwrap(), &chain).unwrap_err();
    assert!(matches!(err, ResponseProblem::TooLong { .. }), "{err}");
}

// ---- the configured root bundle (CA_ROOT_CA) trusted together with the CA's answer ----

/// A peer workload's TLS material: a leaf under `root` for `sa`, trusting `trusts`.
fn peer(root: &TestRoot, sa: &str, trusts: Vec<CertificateDer<'static>>) -> TlsMaterial {
    TlsMaterial::new(Arc::new(root.leaf(&[&id(sa).to_string()], trusts))).unwrap()
}

/// Whether our certificate from `rx` accepts `peer` as a client (inbound) and as a server (outbound).
async fn accepts(ours: &crate::tls::WorkloadTls, peer: &TlsMaterial) -> (bool, bool) {
    let ours = ours.current();
    let inbound = handshake(&ours, peer, vec![id("a")]).await;
    let outbound = handshake(peer, &ours, vec![id("peer")]).await;
    (inbound.server.is_ok(), outbound.client.is_ok())
}

#[tokio::test]
async fn peers_under_the_second_root_of_the_configured_bundle_are_accepted() {
    let first = TestRoot::new("mesh root 1");
    let second = TestRoot::new("mesh root 2");
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("root-cert.pem");
    std::fs::write(
        &bundle,
        format!("{}{}", first.cert.pem(), second.cert.pem()),
    )
    .unwrap();
    let trusts_both = vec![first.der(), second.der()];
    // The CA signs with the first root and its answer names only that one.
    let server = serve_fake(FakeCa::with_root(Answer::Good, first)).await;
    let target = GrpcTarget {
        root: RootCa::File(bundle),
        ..target(server.addr)
    };
    let client = CaClient::new(&target, literal("t"), HOUR, false).unwrap();
    let manager = CertManager::new(Arc::new(client));
    let ours = crate::tls::WorkloadTls::new(manager.get(&id("a")).await.unwrap()).unwrap();

    // A peer whose certificate already comes from the second root.
    let rotated = peer(&second, "peer", trusts_both);
    assert_eq!(accepts(&ours, &rotated).await, (true, true));
    // A certificate from a root in neither the answer nor the bundle is still refused.
    let stranger = TestRoot::new("stranger");
    let foreign = peer(
        &stranger,
        "peer",
        vec![stranger.der(), ours.current().cert.roots[0].clone()],
    );
    assert_eq!(accepts(&ours, &foreign).await, (false, false));
    server.stop().await;
}

#[tokio::test]
async fn a_root_added_to_the_bundle_file_is_trusted_without_a_restart_and_a_removed_one_no_longer()
{
    let first = TestRoot::new("mesh root 1");
    let second = TestRoot::new("mesh root 2");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root-cert.pem");
    std::fs::write(&path, first.cert.pem()).unwrap();
    let first_pem = first.cert.pem();
    let trusts_both = vec![first.der(), second.der()];
    let server = serve_fake(FakeCa::with_root(Answer::Good, first)).await;
    let mut client = CaClient::new(&target(server.addr), literal("t"), HOUR, false).unwrap();
    client.bundle = Some(TrustBundle::watch_file(path.clone(), Duration::from_millis(50)).unwrap());
    let manager = CertManager::new(Arc::new(client));
    let mut rx = manager.get(&id("a")).await.unwrap();
    rx.borrow_and_update();
    let ours = crate::tls::WorkloadTls::new(rx.clone()).unwrap();
    let rotated = peer(&second, "peer", trusts_both);
    assert_eq!(accepts(&ours, &rotated).await, (false, false));

    std::fs::write(&path, format!("{first_pem}{}", second.cert.pem())).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("the new bundle is published")
        .unwrap();
    assert_eq!(accepts(&ours, &rotated).await, (true, true));

    // A broken edit keeps the last good bundle.
    std::fs::write(&path, "not PEM at all").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(accepts(&ours, &rotated).await, (true, true));

    // The rotation is over: the second root is removed again.
    std::fs::write(&path, &first_pem).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("the smaller bundle is published")
        .unwrap();
    assert_eq!(accepts(&ours, &rotated).await, (false, false));
    server.stop().await;
}

#[tokio::test]
async fn a_root_bundle_that_does_not_parse_is_a_clear_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root-cert.pem");
    let addr = listener().await.local_addr().unwrap();
    for (content, want) in [
        ("", "no CERTIFICATE"),
        (
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            "not valid PEM",
        ),
        (&*signer::to_pem(b"not a certificate"), "not valid X.509"),
    ] {
        std::fs::write(&path, content).unwrap();
        let bad = GrpcTarget {
            root: RootCa::File(path.clone()),
            ..target(addr)
        };
        let err = CaClient::new(&bad, literal("t"), HOUR, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("root-cert.pem") && text.contains(want),
            "{text}"
        );
    }
    // Not there yet: no error, the file is picked up once it appears.
    let later = GrpcTarget {
        root: RootCa::File(dir.path().join("later.pem")),
        ..target(addr)
    };
    let client = CaClient::new(&later, literal("t"), HOUR, false).unwrap();
    assert!(client.trust_bundle().unwrap().roots().is_empty());
    // SYSTEM roots (what `target` uses) verify the CA server only, never workload peers.
    let client = CaClient::new(&target(addr), literal("t"), HOUR, false).unwrap();
    assert!(client.trust_bundle().is_none());
}

#[tokio::test]
async fn a_ca_answer_carrying_two_roots_trusts_both() {
    let cert = ask_fake(Answer::TwoRoots).await.expect("accepted");
    assert_eq!(cert.chain.len(), 1, "the roots are not intermediates");
    assert_eq!(cert.roots.len(), 2);
}
