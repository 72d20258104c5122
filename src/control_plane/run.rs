//! Running the whole control plane: the mesh CA, its serving certificate, the CA service and delta ADS on one
//! TLS listener — what `meshnode control-plane` does.
//!
//! Input: [`RunOptions`] (mesh file, CA choice, listen address, optional certificate files) and a shutdown
//! future. Output: the root certificate written where clients expect it (`--root-cert-out`: their
//! `XDS_ROOT_CA` / `CA_ROOT_CA`), and the gRPC server until shutdown. CA requests are authorized against
//! the `tokens` of the current mesh file (re-read on change; rules in `tokens.rs`): a node proxy's token may
//! ask for identities of pods on its node (istiod's `CA_TRUSTED_NODE_ACCOUNTS` rule), a workload token only
//! for its own; xDS streams are for node proxy tokens and waypoints' identities (what each may see: `tokens.rs`). At shutdown the server drains for
//! [`RunOptions::drain_deadline`], then closes what is left (see `server.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::{BuiltinCa, CaService, CsrSigner, PluginCa};

use super::server::ServeLimits;
use super::tokens::{self, MeshTokens};
use super::{server, AdsLimits, ControlPlane, POLL_INTERVAL, SERVER_NAMES};

/// Longest workload certificate the CA signs (istiod's `MAX_WORKLOAD_CERT_TTL`: 90 days).
const MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of the control plane's own serving certificate; a restart issues a new one.
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where the mesh CA comes from.
#[derive(Debug, Clone)]
pub enum CaChoice {
    /// meshnode's built-in CA, its root kept in `<dir>/ca` (shared with proxies using the same state dir).
    Builtin(PathBuf),
    /// An istiod plug-in CA directory (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
    Plugin(PathBuf),
}

/// Everything `meshnode control-plane` is told.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The mesh file.
    pub config: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The mesh CA.
    pub ca: CaChoice,
    /// A serving certificate chain and key (PEM files) instead of one issued by the mesh CA.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Where to write the mesh root certificate for clients.
    pub root_cert_out: Option<PathBuf>,
    /// At shutdown, how long connections get to finish before the rest are closed
    /// ([`server::DEFAULT_DRAIN_DEADLINE`] unless told otherwise).
    pub drain_deadline: Duration,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The mesh file is unusable.
    #[error(transparent)]
    Config(#[from] super::config::Error),
    /// The CA is unusable.
    #[error("mesh CA: {0}")]
    Ca(#[from] crate::identity::Error),
    /// TLS could not be set up.
    #[error(transparent)]
    Server(#[from] server::Error),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Starts the control plane on `listener` and serves until `shutdown` completes.
pub async fn run(
    opts: RunOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let plane = ControlPlane::start(&opts.config, POLL_INTERVAL)?;
    let ca: Arc<dyn CsrSigner> = match &opts.ca {
        CaChoice::Builtin(dir) => Arc::new(BuiltinCa::load_or_create(dir, MAX_WORKLOAD_TTL)?),
        CaChoice::Plugin(dir) => Arc::new(PluginCa::load(dir, MAX_WORKLOAD_TTL)?),
    };
    if let Some(out) = &opts.root_cert_out {
        crate::file_watch::write_atomically(out, ca.roots_pem().as_bytes()).map_err(|source| {
            RunError::Io {
                what: format!("writing the root certificate to {}", out.display()),
                source,
            }
        })?;
    }
    let tls = match &opts.tls_files {
        Some((cert, key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| RunError::Io {
                    what: format!("reading {}", p.display()),
                    source,
                })
            };
            server::tls_config(&read(cert)?, &read(key)?)?
        }
        None => {
            let local = listener.local_addr().map_err(|source| RunError::Io {
                what: "reading the listen address".into(),
                source,
            })?;
            let mut names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
            if !local.ip().is_unspecified() && !names.contains(&local.ip().to_string()) {
                names.push(local.ip().to_string());
            }
            let (chain, key) = ca.issue_server(&names, SERVING_CERT_TTL)?;
            server::tls_config(chain.as_bytes(), key.as_bytes())?
        }
    };
    let auth = Arc::new(MeshTokens::new(plane.config()));
    // xDS, like istiod's, is only for holders of a token from the mesh file: node proxy tokens, and the
    // tokens of waypoints' identities (for their own namespace's waypoints); a file with no tokens serves
    // xDS to anyone (and the CA to no one).
    let tokens = plane.config();
    if tokens.borrow().tokens.is_empty() {
        tracing::warn!("the mesh file lists no tokens: xDS is served without authentication and the CA refuses every request");
    }
    let xds_auth = move |mut req: tonic::Request<()>| {
        let cfg = tokens.borrow().clone();
        let token = crate::identity::bearer_token(&req)?;
        let owner = tokens::xds_caller(&cfg, token.as_deref(), time::OffsetDateTime::now_utc())?;
        if let Some(owner) = owner {
            req.extensions_mut().insert(owner);
        }
        Ok(req)
    };
    // CA requests are authorized in full by the CA service; a known token here only marks the connection as
    // in use (so an unauthenticated one goes idle).
    let ca_tokens = plane.config();
    let ca_mark = move |req: tonic::Request<()>| {
        let cfg = ca_tokens.borrow().clone();
        if let Ok(Some(t)) = crate::identity::bearer_token(&req) {
            if tokens::find(&cfg, &t, time::OffsetDateTime::now_utc()).is_ok() {
                server::mark_request(&req);
            }
        }
        Ok(req)
    };
    let ca_service = tonic::service::interceptor::InterceptedService::new(
        CaService::new(ca, auth, MAX_WORKLOAD_TTL).into_server(),
        ca_mark,
    );
    // A stream ends when its token leaves the file or expires.
    let stream_tokens = plane.config();
    let ads = plane
        .ads(AdsLimits::default())
        .with_token_check(Arc::new(move |owner| {
            let cfg = stream_tokens.borrow().clone();
            tokens::stream_still_allowed(&cfg, owner, time::OffsetDateTime::now_utc())
        }));
    let router = server::router_with_auth(ads, xds_auth).add_service(ca_service);
    let limits = ServeLimits {
        drain_deadline: opts.drain_deadline,
        ..ServeLimits::default()
    };
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), config = %opts.config.display(), "control plane serving xDS and CA");
    server::serve(listener, tls, router, limits, shutdown).await?;
    Ok(())
}
