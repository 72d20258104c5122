//! `CaService`: the Istio CA gRPC service of `meshnode control-plane` (istiod's CA role).
//!
//! Input: `CreateCertificate` requests (PEM CSR, `validity_duration`, optional
//! `ImpersonatedIdentity` metadata, `authorization: Bearer <token>` header), a [`CsrSigner`]
//! ([`BuiltinCa`] or [`PluginCa`]) and an [`Authenticate`] policy (e.g. [`TokenAuthenticator`]).
//! Output: `cert_chain` = PEM leaf, intermediates, root; or a gRPC status:
//! `InvalidArgument` naming what is wrong with the request, `Unauthenticated` (no or unknown
//! token), `PermissionDenied` (token not allowed this identity), `Internal` (signing failed).
//!
//! The CSR must verify and carry exactly one URI SAN, a SPIFFE id; that id is what gets signed.
//! Impersonation metadata, when present, must name the same id. The lifetime is the requested
//! one capped at `max_ttl` (zero or negative: `max_ttl`).

use std::sync::Arc;
use std::time::Duration;

use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use super::caclient::IMPERSONATED_IDENTITY;
use super::signer::{self, Csr, CsrProblem};
use super::{BuiltinCa, Error, Identity, PluginCa};
use token::TokenDigest;

pub mod token;
use crate::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};

/// Largest request decoded. A CSR is about 1 KiB; anything much bigger is not one.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Decides whether the caller holding `token` may have a certificate for `requested`.
pub trait Authenticate: Send + Sync + 'static {
    /// `Ok` to sign; `Unauthenticated` when the token is missing or unknown; `PermissionDenied`
    /// when the caller may not have this identity. `impersonating` is true when the request
    /// carried `ImpersonatedIdentity` metadata (a shared node proxy asking for a workload).
    fn authorize(
        &self,
        token: Option<&str>,
        requested: &Identity,
        impersonating: bool,
    ) -> Result<(), Status>;
}

/// What a token lets its holder have.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Grant {
    /// A workload: only this identity.
    Identity(Identity),
    /// A node proxy: any identity of the authenticator's trust domain on behalf of the workloads
    /// it serves, asked for with `ImpersonatedIdentity` metadata (istiod issues the caller's own
    /// identity when that metadata is absent, and a node proxy token names none here).
    NodeProxy,
}

/// A fixed table of bearer tokens (kept as SHA-256 digests, compared in constant time) and what
/// each grants.
pub struct TokenAuthenticator {
    trust_domain: String,
    tokens: Vec<(TokenDigest, Grant)>,
}

impl TokenAuthenticator {
    /// Tokens for the trust domain `trust_domain` (node proxies are limited to it).
    pub fn new(
        trust_domain: impl Into<String>,
        tokens: impl IntoIterator<Item = (String, Grant)>,
    ) -> TokenAuthenticator {
        TokenAuthenticator {
            trust_domain: trust_domain.into(),
            tokens: tokens
                .into_iter()
                .map(|(t, g)| (TokenDigest::of(&t), g))
                .collect(),
        }
    }
}

/// Never prints the tokens.
impl std::fmt::Debug for TokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthenticator")
            .field("trust_domain", &self.trust_domain)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Authenticate for TokenAuthenticator {
    fn authorize(
        &self,
        token: Option<&str>,
        requested: &Identity,
        impersonating: bool,
    ) -> Result<(), Status> {
        let token = token.ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        let presented = TokenDigest::of(token);
        // Every entry is compared, so the time taken does not depend on which one matches.
        let mut grant = None;
        for (digest, g) in &self.tokens {
            if digest.matches(&presented) {
                grant = Some(g);
            }
        }
        let grant = grant.ok_or_else(|| Status::unauthenticated("unknown bearer token"))?;
        match grant {
            Grant::Identity(own) if own == requested => Ok(()),
            Grant::Identity(own) => Err(Status::permission_denied(format!(
                "a token for {own} may not request {requested}"
            ))),
            Grant::NodeProxy if !impersonating => Err(Status::permission_denied(format!(
                "a node proxy token gets {requested} only on a workload's behalf, with \
                 {IMPERSONATED_IDENTITY} metadata"
            ))),
            Grant::NodeProxy if requested.trust_domain() == self.trust_domain => Ok(()),
            Grant::NodeProxy => Err(Status::permission_denied(format!(
                "{requested} is outside the trust domain {}",
                self.trust_domain
            ))),
        }
    }
}

/// Signs CSRs: a CA that issues workload leaves.
pub trait CsrSigner: Send + Sync + 'static {
    /// Signs `csr_pem` for `id`, valid for `ttl` (backdated a little for clock skew). Returns PEM
    /// certificates: leaf, intermediates, root.
    fn sign_csr(&self, csr_pem: &str, id: &Identity, ttl: Duration) -> Result<Vec<String>, Error>;
    /// Issues a serving certificate for the control plane itself, with DNS/IP names (as istiod's cert is
    /// signed by the mesh CA). Returns the PEM chain (leaf first, root last) and the PEM PKCS#8 key.
    fn issue_server(&self, names: &[String], ttl: Duration) -> Result<(String, String), Error>;
    /// The mesh's trust roots, PEM (what proxies use as `XDS_ROOT_CA` / `CA_ROOT_CA`).
    fn roots_pem(&self) -> String;
}

/// Both local CAs sign through their [`signer::Signer`].
macro_rules! csr_signer_via_signer {
    ($($ca:ty),*) => {$(
        impl CsrSigner for $ca {
            fn sign_csr(&self, csr_pem: &str, id: &Identity, ttl: Duration) -> Result<Vec<String>, Error> {
                let chain = self.signer().sign_csr(csr_pem, id, ttl)?;
                Ok(chain.iter().map(|c| signer::to_pem(c)).collect())
            }
            fn issue_server(&self, names: &[String], ttl: Duration) -> Result<(String, String), Error> {
                self.signer().issue_server(names, ttl)
            }
            fn roots_pem(&self) -> String {
                self.signer().roots().iter().map(|c| signer::to_pem(c)).collect()
            }
        }
    )*};
}

csr_signer_via_signer!(BuiltinCa, PluginCa);

/// The `IstioCertificateService` implementation.
pub struct CaService {
    signer: Arc<dyn CsrSigner>,
    auth: Arc<dyn Authenticate>,
    max_ttl: Duration,
}

impl CaService {
    /// A service signing with `signer` for callers `auth` allows, for at most `max_ttl`.
    pub fn new(
        signer: Arc<dyn CsrSigner>,
        auth: Arc<dyn Authenticate>,
        max_ttl: Duration,
    ) -> CaService {
        CaService {
            signer,
            auth,
            max_ttl,
        }
    }

    /// The tonic service to add to a `tonic::transport::Server`, with requests limited to
    /// [`MAX_REQUEST_BYTES`].
    pub fn into_server(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Handles one request (everything but the gRPC plumbing).
    pub(crate) fn create(
        &self,
        token: Option<&str>,
        request: &IstioCertificateRequest,
    ) -> Result<Vec<String>, Status> {
        let invalid = |problem: CsrProblem| Status::invalid_argument(problem.to_string());
        let csr = Csr::parse(&request.csr).map_err(invalid)?;
        let id = csr.identity().map_err(invalid)?;
        let impersonated = impersonated_identity(request)?;
        if let Some(other) = &impersonated {
            if *other != id.to_string() {
                return Err(invalid(CsrProblem::IdentityMismatch {
                    csr: id.to_string(),
                    requested: other.clone(),
                }));
            }
        }
        self.auth.authorize(token, &id, impersonated.is_some())?;
        let ttl = match u64::try_from(request.validity_duration) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(self.max_ttl),
            _ => self.max_ttl,
        };
        let chain = self
            .signer
            .sign_csr(&request.csr, &id, ttl)
            .map_err(|e| match e {
                Error::Csr { problem, .. } => invalid(problem),
                other => {
                    tracing::error!(%id, error = %other, "signing a CSR failed");
                    Status::internal(format!("cannot sign the certificate for {id}"))
                }
            })?;
        tracing::info!(%id, ?ttl, impersonated = impersonated.is_some(), "signed a workload certificate");
        Ok(chain)
    }
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = bearer_token(&request)?;
        let cert_chain = self.create(token.as_deref(), request.get_ref())?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// The token of an `authorization: Bearer <token>` header, if there is one (the control plane's xDS
/// check reads it the same way).
pub fn bearer_token<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not ASCII"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("the authorization header is not a Bearer token"))?
        .trim();
    Ok((!token.is_empty()).then(|| token.to_string()))
}

/// The `ImpersonatedIdentity` metadata value, if present; not a string → `InvalidArgument`.
fn impersonated_identity(request: &IstioCertificateRequest) -> Result<Option<String>, Status> {
    let Some(value) = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(id)) => Ok(Some(id.clone())),
        _ => Err(Status::invalid_argument(format!(
            "metadata {IMPERSONATED_IDENTITY} must be a string"
        ))),
    }
}

#[cfg(test)]
mod tests;
